//! State documents: JSON objects, changed with RFC 7386 merge patches.
//!
//! - [`apply`]: applies a merge patch (the `json-patch` crate does the RFC work).
//! - [`diff`]: the merge patch that turns one document into another (what a waking device that
//!   applied version N needs to reach the current version).
//! - [`delta`]: desired minus reported, like a device shadow's delta: every desired field whose
//!   reported value differs, recursively; fields only the device reports are not part of it.
//! - [`apply_stamped`] / [`replace_stamped`]: a device's reports in any order reach the state
//!   they give in sequence order. JetStream redelivers a message after its `ack_wait`, so when
//!   a worker dies or a batch is retried a device's report N can arrive after its report N+1.
//!   Like a device twin's per-property metadata, every field the device wrote keeps the
//!   sequence of the report that wrote it (removed fields keep theirs as a tombstone), and a
//!   late report changes only what no later report wrote.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Per-field write stamps of a reported document: the JSON Pointer (RFC 6901) of every field a
/// report set or removed, and the device sequence of that report.
///
/// The empty pointer stamps the whole document (a full report). A stamp on a path also means "everything below was replaced at this sequence": it stays
/// when a later report turns the field back into an object, so an even older write into that
/// object stays dead.
pub type Stamps = BTreeMap<String, i64>;

/// Applies the merge patch `patch`, sent as device sequence `sequence`, to `document`, leaving
/// out every part this report or one with a higher sequence already wrote (a report never
/// rewrites its own fields: a redelivery with other content is still a redelivery). Returns
/// whether the document changed. Applying the same report twice changes nothing the second time, and applying a
/// device's reports in any order gives the document of applying them in sequence order (for
/// patches without empty objects: `{}` creates an object and carries no stamp).
pub fn apply_stamped(
    document: &mut Value,
    stamps: &mut Stamps,
    patch: &Value,
    sequence: i64,
) -> bool {
    if stamps.get(ROOT).is_some_and(|stamp| *stamp >= sequence) {
        // A later full report replaced the whole document.
        return false;
    }
    merge_stamped(document, stamps, patch, "", sequence)
}

/// Replaces `document` with `full` (a full report sent as `sequence`), leaving out every part
/// a report with a higher sequence already wrote: every field of `full` is written and every
/// field missing from it removed, with the report's stamp.
pub fn replace_stamped(
    document: &mut Value,
    stamps: &mut Stamps,
    full: &Value,
    sequence: i64,
) -> bool {
    let patch = replacement(document, full);
    let changed = apply_stamped(document, stamps, &patch, sequence);
    if stamps.get(ROOT).is_none_or(|stamp| *stamp < sequence) {
        // Everything older than this report is gone: the root stamp says so for any late
        // report, so older stamps are no longer needed.
        stamps.retain(|_, stamp| *stamp > sequence);
        stamps.insert(ROOT.to_owned(), sequence);
    }
    changed
}

/// The stamp of the whole document, set by full reports.
const ROOT: &str = "";

/// The merge patch that writes every leaf of `to` and removes every field of `from` missing
/// from `to` (unlike [`diff`], unchanged fields are written too, so they get a new stamp).
fn replacement(from: &Value, to: &Value) -> Value {
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            let mut patch: Map<String, Value> = a
                .keys()
                .filter(|key| !b.contains_key(*key))
                .map(|key| (key.clone(), Value::Null))
                .collect();
            for (key, new) in b {
                let value = match a.get(key) {
                    Some(old) => replacement(old, new),
                    None => new.clone(),
                };
                patch.insert(key.clone(), value);
            }
            Value::Object(patch)
        }
        _ => to.clone(),
    }
}

/// `prefix` followed by the RFC 6901 reference token of `key`.
fn pointer(prefix: &str, key: &str) -> String {
    let mut path = String::with_capacity(prefix.len() + key.len() + 1);
    path.push_str(prefix);
    path.push('/');
    if key.contains(['~', '/']) {
        path.push_str(&key.replace('~', "~0").replace('/', "~1"));
    } else {
        path.push_str(key);
    }
    path
}

/// Sets the stamp of `path` to `seq`.
fn stamp(stamps: &mut Stamps, path: String, seq: i64) {
    match stamps.get_mut(&path) {
        Some(stamp) => *stamp = seq,
        None => {
            stamps.insert(path, seq);
        }
    }
}

/// Merges `patch` into `target` as report `seq` (see [`apply_stamped`]); returns whether
/// `target` changed. Every change is noticed where it is made, so no copy of the document is
/// needed to tell.
fn merge_stamped(
    target: &mut Value,
    stamps: &mut Stamps,
    patch: &Value,
    prefix: &str,
    seq: i64,
) -> bool {
    let Value::Object(fields) = patch else {
        return false;
    };
    let mut changed = false;
    if !target.is_object() {
        *target = Value::Object(Map::new());
        changed = true;
    }
    let Value::Object(object) = target else {
        unreachable!("made an object above")
    };
    for (key, value) in fields {
        let path = pointer(prefix, key);
        if value.is_object() {
            // A later report replaced this field (or an ancestor, checked on the way down):
            // what this one wrote below it is gone.
            if stamps.get(&path).is_some_and(|stamp| *stamp >= seq) {
                continue;
            }
            let child = match object.get_mut(key) {
                Some(child) => child,
                None => {
                    changed = true;
                    object.entry(key.clone()).or_insert(Value::Null)
                }
            };
            changed |= merge_stamped(child, stamps, value, &path, seq);
        } else {
            changed |= write_leaf(object, key, path, value, stamps, seq);
        }
    }
    changed
}

/// Sets (or, for `null`, removes) `object[key]` as report `seq` does, unless a later report
/// wrote it; when a later report wrote something below it, only what is older goes. Returns
/// whether `object` changed.
fn write_leaf(
    object: &mut Map<String, Value>,
    key: &str,
    path: String,
    value: &Value,
    stamps: &mut Stamps,
    seq: i64,
) -> bool {
    if stamps.get(&path).is_some_and(|stamp| *stamp >= seq) {
        return false;
    }
    // Stamps below this field: usually none (a leaf stays a leaf).
    let below = format!("{path}/");
    let stamped_below: Vec<(String, i64)> = stamps
        .range::<str, _>((
            std::ops::Bound::Included(below.as_str()),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(k, _)| k.starts_with(&below))
        .map(|(k, stamp)| (k.clone(), *stamp))
        .collect();
    if stamped_below.iter().any(|(_, stamp)| *stamp >= seq) {
        // In sequence order this write came first and a later one turned the field into an
        // object again: of that object, only the older fields are gone.
        let mut changed = false;
        if let Some(Value::Object(child)) = object.get_mut(key) {
            let keys: Vec<String> = child.keys().cloned().collect();
            for child_key in keys {
                let child_path = pointer(&path, &child_key);
                changed |= write_leaf(child, &child_key, child_path, &Value::Null, stamps, seq);
            }
        }
        // Whatever below is older than this write is gone, even if it arrives later.
        stamp(stamps, path, seq);
        return changed;
    }
    for (k, _) in stamped_below {
        stamps.remove(&k);
    }
    let changed = if value.is_null() {
        object.remove(key).is_some()
    } else {
        match object.get_mut(key) {
            Some(old) if old == value => false,
            Some(old) => {
                *old = value.clone();
                true
            }
            None => {
                object.insert(key.to_owned(), value.clone());
                true
            }
        }
    };
    stamp(stamps, path, seq);
    changed
}

/// A document that is not a JSON object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a state document must be a JSON object, got {found}")]
pub struct NotAnObject {
    pub found: &'static str,
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses `bytes` as a JSON object.
pub fn parse_object(bytes: &[u8]) -> Result<Value, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    ensure_object(&value).map_err(|e| e.to_string())?;
    if !storable_document(&value) {
        return Err(format!("strings and keys {NOT_STORABLE}"));
    }
    Ok(value)
}

/// Checks what [`parse_object`] checks, with the same errors, without building the document:
/// ingress validates every report and forwards its bytes, so the value would only be dropped.
pub fn check_object(bytes: &[u8]) -> Result<(), String> {
    let mut nul = false;
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let found = serde::de::DeserializeSeed::deserialize(Walk { nul: &mut nul }, &mut deserializer)
        .and_then(|found| deserializer.end().map(|()| found))
        .map_err(|e| format!("invalid JSON: {e}"))?;
    if found != "an object" {
        return Err(NotAnObject { found }.to_string());
    }
    if nul {
        // Rare, and not always a refusal: a repeated key keeps only its last value, so a NUL
        // in an earlier one is dropped by the parse. The parse decides.
        return parse_object(bytes).map(|_| ());
    }
    Ok(())
}

/// Walks one JSON value, noting any string or key that holds a NUL; yields the value's
/// [`kind`].
struct Walk<'a> {
    nul: &'a mut bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for Walk<'_> {
    type Value = &'static str;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Walk<'_> {
    type Value = &'static str;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok("null")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok("a boolean")
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok("a number")
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok("a number")
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok("a number")
    }

    fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
        *self.nul |= storable(text).is_err();
        Ok("a string")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut items: A,
    ) -> Result<Self::Value, A::Error> {
        while items
            .next_element_seed(Walk {
                nul: &mut *self.nul,
            })?
            .is_some()
        {}
        Ok("an array")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut fields: A,
    ) -> Result<Self::Value, A::Error> {
        while fields
            .next_key_seed(Walk {
                nul: &mut *self.nul,
            })?
            .is_some()
        {
            fields.next_value_seed(Walk {
                nul: &mut *self.nul,
            })?;
        }
        Ok("an object")
    }
}

/// Why text is refused by [`storable`].
pub const NOT_STORABLE: &str =
    "may not contain NUL characters (\\u0000): PostgreSQL cannot store them";

/// Whether PostgreSQL can store `text` (its `text` and `jsonb` refuse NUL: input holding one
/// would fail every transaction that tries to store it, on every retry).
pub fn storable(text: &str) -> Result<(), &'static str> {
    if text.contains('\0') {
        Err(NOT_STORABLE)
    } else {
        Ok(())
    }
}

/// Whether every string and key of `value` is [`storable`].
fn storable_document(value: &Value) -> bool {
    match value {
        Value::String(s) => storable(s).is_ok(),
        Value::Array(items) => items.iter().all(storable_document),
        Value::Object(fields) => fields
            .iter()
            .all(|(key, field)| storable(key).is_ok() && storable_document(field)),
        _ => true,
    }
}

/// Checks that `value` is a JSON object.
pub fn ensure_object(value: &Value) -> Result<(), NotAnObject> {
    if value.is_object() {
        Ok(())
    } else {
        Err(NotAnObject { found: kind(value) })
    }
}

/// Applies the merge patch `patch` to `document` in place.
pub fn apply(document: &mut Value, patch: &Value) {
    json_patch::merge(document, patch);
}

/// The merge patch that turns `from` into `to`: `apply(from, diff(from, to)) == to` for objects
/// whose values contain no `null` (merge patches cannot express a literal null).
pub fn diff(from: &Value, to: &Value) -> Value {
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            let mut patch = Map::new();
            for (key, old) in a {
                match b.get(key) {
                    None => {
                        patch.insert(key.clone(), Value::Null);
                    }
                    Some(new) if new != old => {
                        patch.insert(key.clone(), diff(old, new));
                    }
                    Some(_) => {}
                }
            }
            for (key, new) in b {
                if !a.contains_key(key) {
                    patch.insert(key.clone(), new.clone());
                }
            }
            Value::Object(patch)
        }
        _ => to.clone(),
    }
}

/// Desired minus reported: the desired fields the device has not reached yet. `None` when the
/// device is in sync.
pub fn delta(desired: &Value, reported: &Value) -> Option<Value> {
    match (desired, reported) {
        (Value::Object(want), Value::Object(have)) => {
            let mut out = Map::new();
            for (key, value) in want {
                match have.get(key) {
                    Some(current) => {
                        if let Some(d) = delta(value, current) {
                            out.insert(key.clone(), d);
                        }
                    }
                    None => {
                        if !value.is_null() {
                            out.insert(key.clone(), value.clone());
                        }
                    }
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        _ if desired == reported => None,
        _ => Some(desired.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_then_apply_reaches_the_target() {
        let from = json!({"fw": "1.0", "net": {"wifi": true, "ssid": "a"}, "gone": 1});
        let to = json!({"fw": "1.1", "net": {"wifi": true, "ssid": "b"}, "new": [1, 2]});
        let patch = diff(&from, &to);
        assert_eq!(
            patch,
            json!({"fw": "1.1", "net": {"ssid": "b"}, "gone": null, "new": [1, 2]})
        );
        let mut doc = from.clone();
        apply(&mut doc, &patch);
        assert_eq!(doc, to);
        assert_eq!(diff(&to, &to), json!({}));
    }

    #[test]
    fn delta_is_desired_minus_reported() {
        let desired = json!({"fw": "1.1", "net": {"wifi": true, "ssid": "b"}});
        let reported = json!({"fw": "1.0", "net": {"wifi": true, "ssid": "b"}, "temp": 21});
        assert_eq!(delta(&desired, &reported), Some(json!({"fw": "1.1"})));
        let synced = json!({"fw": "1.1", "net": {"wifi": true, "ssid": "b"}, "temp": 3});
        assert_eq!(delta(&desired, &synced), None);
        assert_eq!(
            delta(&json!({"net": {"ssid": "c"}}), &json!({})),
            Some(json!({"net": {"ssid": "c"}}))
        );
    }

    #[test]
    fn only_objects_are_documents() {
        assert!(parse_object(b"{\"a\":1}").is_ok());
        assert_eq!(
            parse_object(b"[1]").unwrap_err(),
            "a state document must be a JSON object, got an array"
        );
        assert!(
            parse_object(b"{nope")
                .unwrap_err()
                .starts_with("invalid JSON")
        );
    }

    #[test]
    fn nul_characters_are_refused_anywhere_in_a_document() {
        for bad in [
            &br#"{"a": "x\u0000y"}"#[..],
            br#"{"a\u0000": 1}"#,
            br#"{"a": [{"b": ["\u0000"]}]}"#,
        ] {
            let error = parse_object(bad).unwrap_err();
            assert!(error.contains("u0000"), "{error}");
        }
        // A backslash followed by the text u0000 is not a NUL.
        assert!(parse_object(br#"{"a": "\\u0000"}"#).is_ok());
    }

    mod checking_without_parsing {
        use super::*;
        use proptest::prelude::*;

        /// JSON-like text from pieces that hit every rule: nesting, every kind at the top,
        /// NUL escapes in strings and keys, broken syntax, trailing garbage.
        fn text() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                Just("{"),
                Just("}"),
                Just("["),
                Just("]"),
                Just(","),
                Just(":"),
                Just("\"a\""),
                Just("\"\\u0000\""),
                Just("\"x\\u0000y\""),
                Just("\"\\\\u0000\""),
                Just("1"),
                Just("-2.5e3"),
                Just("1e400"),
                Just("true"),
                Just("null"),
                Just(" "),
                Just("\"\\ud800\""),
                Just("x"),
            ];
            proptest::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat().into_bytes())
        }

        proptest! {
            #[test]
            fn check_object_says_what_parse_object_says(bytes in text()) {
                prop_assert_eq!(check_object(&bytes), parse_object(&bytes).map(|_| ()));
            }

            #[test]
            fn check_object_agrees_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                prop_assert_eq!(check_object(&bytes), parse_object(&bytes).map(|_| ()));
            }
        }

        #[test]
        fn check_object_agrees_on_documents_that_break_one_rule() {
            for bytes in [
                &br#"{"a": {"b": [1, "x"]}}"#[..],
                br#"{"a": "x\u0000y"}"#,
                br#"{"a\u0000": 1}"#,
                br#"[{"a": 1}]"#,
                br#""text""#,
                b"null",
                b"7",
                br#"{"a": "\u0000"} trailing"#,
                br#"{"a": "\u0000", "b": }"#,
                br#"{"a": "\u0000", "a": 1}"#,
                br#"{"a": {"b": "\u0000"}, "a": {}}"#,
                br#"{"a": 1, "a": "\u0000"}"#,
                b"",
            ] {
                assert_eq!(
                    check_object(bytes),
                    parse_object(bytes).map(|_| ()),
                    "{bytes:?}"
                );
            }
        }
    }

    #[test]
    fn a_late_report_fills_in_only_what_no_later_report_wrote() {
        let mut doc = json!({});
        let mut stamps = Stamps::new();
        assert!(apply_stamped(
            &mut doc,
            &mut stamps,
            &json!({"a": 2, "c": null}),
            2
        ));
        // Report 1 arrives late: `a` was written by 2, `b` by nobody, `c` removed by 2.
        assert!(apply_stamped(
            &mut doc,
            &mut stamps,
            &json!({"a": 1, "b": 1, "c": 1}),
            1
        ));
        assert_eq!(doc, json!({"a": 2, "b": 1}));
        // The same report again changes nothing.
        assert!(!apply_stamped(
            &mut doc,
            &mut stamps,
            &json!({"a": 1, "b": 1, "c": 1}),
            1
        ));
        assert!(!apply_stamped(
            &mut doc,
            &mut stamps,
            &json!({"a": 2, "c": null}),
            2
        ));
        assert_eq!(
            stamps.get("/c"),
            Some(&2),
            "the removal is kept as a tombstone"
        );
    }

    #[test]
    fn a_late_write_below_a_later_replacement_stays_dead() {
        let mut doc = json!({});
        let mut stamps = Stamps::new();
        // In order: 1 writes net/ssid, 2 removes net, 3 writes net/wifi.
        apply_stamped(&mut doc, &mut stamps, &json!({"net": {"wifi": true}}), 3);
        apply_stamped(&mut doc, &mut stamps, &json!({"net": null}), 2);
        apply_stamped(&mut doc, &mut stamps, &json!({"net": {"ssid": "a"}}), 1);
        assert_eq!(doc, json!({"net": {"wifi": true}}));
    }

    #[test]
    fn keys_with_slashes_and_tildes_are_separate_fields() {
        let mut doc = json!({});
        let mut stamps = Stamps::new();
        apply_stamped(
            &mut doc,
            &mut stamps,
            &json!({"a/b": 2, "a": {"b": 3}, "~": 1}),
            5,
        );
        assert_eq!(doc, json!({"a/b": 2, "a": {"b": 3}, "~": 1}));
        assert_eq!(
            stamps.keys().collect::<Vec<_>>(),
            vec!["/a/b", "/a~1b", "/~0"]
        );
    }

    mod any_order {
        use super::*;
        use proptest::prelude::*;

        /// Small documents over few keys, so reports collide: leaves, removals and nested
        /// objects (never empty: `{}` carries no stamp).
        fn patch(depth: u32) -> BoxedStrategy<Value> {
            let leaf = prop_oneof![
                (0..3i64).prop_map(|n| json!(n)),
                Just(Value::Null),
                Just(json!([1, 2])),
            ];
            let value = if depth == 0 {
                leaf.boxed()
            } else {
                prop_oneof![2 => leaf, 1 => patch(depth - 1)].boxed()
            };
            proptest::collection::btree_map(prop_oneof!["a", "b", "c"], value, 1..3)
                .prop_map(|fields| Value::Object(fields.into_iter().collect()))
                .boxed()
        }

        fn reports() -> impl Strategy<Value = (Vec<(Value, bool)>, Vec<usize>)> {
            proptest::collection::vec((patch(2), proptest::bool::weighted(0.2)), 1..7)
                .prop_flat_map(|reports| {
                    let order: Vec<usize> = (0..reports.len()).collect();
                    (Just(reports), Just(order).prop_shuffle())
                })
        }

        /// Full reports cannot hold removals: a `null` in one means "absent".
        fn strip_nulls(value: &Value) -> Value {
            match value {
                Value::Object(fields) => Value::Object(
                    fields
                        .iter()
                        .filter(|(_, v)| !v.is_null())
                        .map(|(k, v)| (k.clone(), strip_nulls(v)))
                        .collect(),
                ),
                other => other.clone(),
            }
        }

        fn run(reports: &[(Value, bool)], order: impl Iterator<Item = usize>) -> Value {
            let mut doc = json!({});
            let mut stamps = Stamps::new();
            for index in order {
                let (patch, full) = &reports[index];
                let seq = index as i64 + 1;
                let before = doc.clone();
                let changed = if *full {
                    replace_stamped(&mut doc, &mut stamps, &strip_nulls(patch), seq)
                } else {
                    apply_stamped(&mut doc, &mut stamps, patch, seq)
                };
                // What each application says it did is what it did.
                assert_eq!(changed, doc != before, "report {seq}: {patch} on {before}");
            }
            doc
        }

        proptest! {
            #[test]
            fn any_arrival_order_gives_the_state_of_sequence_order((reports, order) in reports()) {
                let in_order = run(&reports, 0..reports.len());
                // Plain merge patches in order are the reference.
                let mut reference = json!({});
                for (patch, full) in &reports {
                    if *full {
                        reference = strip_nulls(patch);
                    } else {
                        apply(&mut reference, patch);
                    }
                }
                prop_assert_eq!(&in_order, &reference);
                let shuffled = run(&reports, order.iter().copied());
                prop_assert_eq!(shuffled, reference);
            }
        }
    }
}
