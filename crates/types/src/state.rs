//! State documents: JSON objects, changed with RFC 7386 merge patches.
//!
//! - [`apply`]: applies a merge patch (the `json-patch` crate does the RFC work).
//! - [`diff`]: the merge patch that turns one document into another (what a waking device that
//!   applied version N needs to reach the current version).
//! - [`delta`]: desired minus reported, like a device shadow's delta: every desired field whose
//!   reported value differs, recursively; fields only the device reports are not part of it.

use serde_json::{Map, Value};

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
    Ok(value)
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
}
