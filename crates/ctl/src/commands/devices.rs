//! `devsyncctl devices`: register, list, show, label, enable / disable devices and replace or
//! merge-patch their desired state, with the SQL of `devsync_store::devices`.
//!
//! Every argument is parsed and checked here, before the database is touched, so bad input
//! fails with one line naming the problem and changes nothing: device ids as
//! `DeviceId::parse` accepts them, `KEY=VALUE` labels (non-empty key without whitespace, `=`
//! or control characters; the value is a string, possibly empty; a key given twice with
//! different values is refused), JSON documents that must be objects (inline or `@FILE`, `@-`
//! for standard input), endpoints that must be `http://` or `https://` URLs with a host.
//! Desired-state changes name `devsyncctl` as their source in the history.

use std::io::Read;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use devsync_runtime::CommonSettings;
use devsync_store::devices::{self, DesiredChange, Device, DeviceError, NewDevice};
use devsync_types::DeviceId;
use serde_json::{Map, Value, json};

use crate::cli::{DevicesArgs, DevicesCommand};
use crate::output::table;

/// The source recorded in `desired_history` for changes made here.
const SOURCE: &str = "devsyncctl";

/// Runs `devsyncctl devices`.
pub async fn run(settings: &CommonSettings, args: DevicesArgs) -> anyhow::Result<()> {
    match args.command {
        DevicesCommand::Register {
            id,
            labels,
            endpoint,
            desired,
            disabled,
        } => {
            let device = NewDevice {
                id: parse_id(&id)?,
                labels: parse_labels(&labels)?,
                http_endpoint: endpoint.as_deref().map(parse_endpoint).transpose()?,
                desired: match &desired {
                    Some(arg) => read_document(arg, "desired state")?,
                    None => Map::new(),
                },
                enabled: !disabled,
            };
            let mut db = connect(settings).await?;
            let version = explain(devices::register(&mut db, &device, SOURCE).await, || {
                format!("register device {}", device.id)
            })?;
            println!(
                "registered device {} ({}, desired version {version})",
                device.id,
                if device.enabled {
                    "enabled"
                } else {
                    "disabled"
                }
            );
        }
        DevicesCommand::List {
            labels,
            limit,
            json,
        } => {
            let filter = parse_labels(&labels)?;
            let db = connect(settings).await?;
            let listing = explain(devices::list(&db, &filter, limit).await, || {
                "list devices".into()
            })?;
            print_list(&listing.devices, json);
            if listing.more && !json {
                println!("(more: raise --limit or narrow with --label)");
            }
        }
        DevicesCommand::Show { id, json } => {
            let id = parse_id(&id)?;
            let db = connect(settings).await?;
            let device = explain(devices::get(&db, &id).await, || format!("read device {id}"))?;
            if json {
                println!("{}", serde_json::to_string(&show_json(&device)?)?);
            } else {
                print_device(&device);
            }
        }
        DevicesCommand::Label { id, set, remove } => {
            let id = parse_id(&id)?;
            let set = parse_labels(&set)?;
            for key in &remove {
                check_label_key(key)?;
            }
            let db = connect(settings).await?;
            let labels = explain(
                devices::update_labels(&db, &id, &set, &remove).await,
                || format!("change labels of device {id}"),
            )?;
            println!("device {id} labels: {}", format_labels(&labels));
        }
        DevicesCommand::Disable { id } => set_enabled(settings, &id, false).await?,
        DevicesCommand::Enable { id } => set_enabled(settings, &id, true).await?,
        DevicesCommand::SetDesired {
            id,
            document,
            merge,
        } => {
            let id = parse_id(&id)?;
            let what = if merge {
                "merge patch"
            } else {
                "desired state"
            };
            let document = read_document(&document, what)?;
            let change = if merge {
                DesiredChange::Merge(document)
            } else {
                DesiredChange::Replace(document)
            };
            let mut db = connect(settings).await?;
            let update = explain(
                devices::set_desired(&mut db, &id, &change, SOURCE).await,
                || format!("change desired state of device {id}"),
            )?;
            if update.changed() {
                println!(
                    "device {id}: desired version {} (was {})",
                    update.version, update.previous_version
                );
            } else {
                println!(
                    "device {id}: desired state unchanged (version {})",
                    update.version
                );
            }
        }
    }
    Ok(())
}

async fn connect(settings: &CommonSettings) -> anyhow::Result<deadpool_postgres::Object> {
    let pool = devsync_store::pool(settings.database.url.expose(), 1)?;
    pool.get().await.context("connect to postgres")
}

async fn set_enabled(settings: &CommonSettings, id: &str, enabled: bool) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let mut db = connect(settings).await?;
    let state = if enabled { "enabled" } else { "disabled" };
    let changed = explain(devices::set_enabled(&mut db, &id, enabled).await, || {
        format!("set device {id} {state}")
    })?;
    if changed {
        println!("device {id} {state}");
    } else {
        println!("device {id} was already {state}");
    }
    Ok(())
}

/// Database failures get `what` as context; refusals (unknown device, id taken, ...) already
/// say what was refused.
fn explain<T>(result: Result<T, DeviceError>, what: impl FnOnce() -> String) -> anyhow::Result<T> {
    match result {
        Ok(value) => Ok(value),
        Err(DeviceError::Store(error)) => Err(anyhow::Error::new(error).context(what())),
        Err(error) => Err(error.into()),
    }
}

fn parse_id(id: &str) -> anyhow::Result<DeviceId> {
    Ok(DeviceId::parse(id)?)
}

/// Checks a label key: not empty, no whitespace, `=` or control characters.
fn check_label_key(key: &str) -> anyhow::Result<()> {
    if key.is_empty() {
        bail!("label key is empty");
    }
    if let Some(c) = key
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '=')
    {
        bail!(
            "label key {key:?} contains {c:?}; whitespace, '=' and control characters are not allowed"
        );
    }
    Ok(())
}

/// Parses `KEY=VALUE` labels into an object of strings.
fn parse_labels(args: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut labels = Map::new();
    for arg in args {
        let Some((key, value)) = arg.split_once('=') else {
            bail!("label {arg:?} is not KEY=VALUE");
        };
        check_label_key(key).with_context(|| format!("label {arg:?}"))?;
        if value.chars().any(char::is_control) {
            bail!("label {arg:?}: the value contains control characters");
        }
        let value = Value::String(value.to_owned());
        if let Some(previous) = labels.get(key)
            && *previous != value
        {
            bail!("label {key:?} is given twice with different values");
        }
        labels.insert(key.to_owned(), value);
    }
    Ok(labels)
}

/// Checks that `url` is an `http://` or `https://` URL with a host (and, if given, a numeric
/// port), without whitespace or control characters.
fn parse_endpoint(url: &str) -> anyhow::Result<String> {
    let bad = |why: &str| anyhow::anyhow!("endpoint {url:?} {why}");
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("is not an http:// or https:// URL"))?;
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace or control characters"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, after)) => (host, after.strip_prefix(':')),
            None => return Err(bad("has an unterminated [IPv6] host")),
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    if let Some(port) = port
        && !port.is_empty()
        && port.parse::<u16>().is_err()
    {
        return Err(bad("has an invalid port"));
    }
    Ok(url.to_owned())
}

/// Reads a JSON object given inline or as `@FILE` (`@-`: standard input).
fn read_document(arg: &str, what: &str) -> anyhow::Result<Map<String, Value>> {
    let (bytes, origin) = match arg.strip_prefix('@') {
        Some("-") => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .with_context(|| format!("read {what} from standard input"))?;
            (bytes, " from standard input".to_owned())
        }
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("read {what} from {path:?}"))?;
            (bytes, format!(" in {path:?}"))
        }
        None => (arg.as_bytes().to_vec(), String::new()),
    };
    match devsync_types::state::parse_object(&bytes) {
        Ok(Value::Object(document)) => Ok(document),
        Ok(_) => bail!("{what}{origin}: not a JSON object"),
        Err(error) => bail!("{what}{origin}: {error}"),
    }
}

fn format_labels(labels: &Map<String, Value>) -> String {
    if labels.is_empty() {
        return "(none)".into();
    }
    labels
        .iter()
        .map(|(key, value)| match value {
            Value::String(value) => format!("{key}={value}"),
            other => format!("{key}={other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn format_time(at: Option<DateTime<Utc>>) -> String {
    at.map(|at| at.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "never".into())
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

fn print_list(devices: &[Device], json: bool) {
    if json {
        for device in devices {
            let line = json!({
                "id": device.id,
                "enabled": device.enabled,
                "labels": device.labels,
                "desired_version": device.desired_version,
                "applied_desired_version": device.applied_desired_version,
                "reported_version": device.reported_version,
                "in_sync": device.in_sync(),
                "last_seen": device.last_seen,
            });
            println!("{line}");
        }
        return;
    }
    if devices.is_empty() {
        println!("no devices");
        return;
    }
    let mut out = table([
        "id",
        "enabled",
        "labels",
        "desired v",
        "applied v",
        "reported v",
        "in sync",
        "last seen (UTC)",
    ]);
    for device in devices {
        out.add_row([
            device.id.to_string(),
            yes_no(device.enabled).to_owned(),
            format_labels(&device.labels),
            device.desired_version.to_string(),
            device.applied_desired_version.to_string(),
            device.reported_version.to_string(),
            yes_no(device.in_sync()).to_owned(),
            format_time(device.last_seen),
        ]);
    }
    println!("{out}");
}

/// The device with its delta (`{}` when in sync) and `in_sync`.
fn show_json(device: &Device) -> anyhow::Result<Value> {
    let mut value = serde_json::to_value(device)?;
    if let Value::Object(fields) = &mut value {
        fields.insert("delta".into(), device.delta().unwrap_or_else(|| json!({})));
        fields.insert("in_sync".into(), Value::Bool(device.in_sync()));
    }
    Ok(value)
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

fn print_device(device: &Device) {
    let delta = device.delta();
    let mut out = table(["device", device.id.as_str()]);
    let rows = [
        ("enabled", yes_no(device.enabled).to_owned()),
        ("labels", format_labels(&device.labels)),
        (
            "endpoint",
            device.http_endpoint.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "desired version",
            format!(
                "{} (changed {})",
                device.desired_version,
                format_time(device.desired_changed_at)
            ),
        ),
        (
            "reported version",
            format!(
                "{} (reported {})",
                device.reported_version,
                format_time(device.reported_at)
            ),
        ),
        (
            "applied desired version",
            format!(
                "{} (acknowledged {})",
                device.applied_desired_version,
                format_time(device.applied_at)
            ),
        ),
        ("in sync", yes_no(delta.is_none()).to_owned()),
        ("last seen (UTC)", format_time(device.last_seen)),
        ("registered (UTC)", format_time(Some(device.created_at))),
    ];
    for (name, value) in rows {
        out.add_row([name.to_owned(), value]);
    }
    println!("{out}");
    println!("desired:\n{}", pretty(&device.desired));
    println!("reported:\n{}", pretty(&device.reported));
    match delta {
        Some(delta) => println!("delta (desired - reported):\n{}", pretty(&delta)),
        None => println!("delta (desired - reported): none, in sync"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_key_value_pairs() {
        let labels = parse_labels(&["env=prod".into(), "site=a=b".into(), "empty=".into()])
            .expect("valid labels");
        assert_eq!(
            Value::Object(labels),
            json!({"env": "prod", "site": "a=b", "empty": ""})
        );
        assert!(parse_labels(&["env=prod".into(), "env=prod".into()]).is_ok());
        for bad in ["noequals", "=v", "a b=c", "k=\u{7}"] {
            assert!(parse_labels(&[bad.into()]).is_err(), "{bad}");
        }
        let twice = parse_labels(&["env=a".into(), "env=b".into()]).unwrap_err();
        assert_eq!(
            twice.to_string(),
            "label \"env\" is given twice with different values"
        );
    }

    #[test]
    fn endpoints_are_http_urls_with_a_host() {
        for good in [
            "http://device.local",
            "https://h:8443/hook?x=1",
            "https://user@h/p",
            "http://[::1]:80/",
        ] {
            assert_eq!(parse_endpoint(good).unwrap(), good);
        }
        for bad in [
            "ftp://h",
            "h/path",
            "HTTP://h",
            "https://",
            "https:///path",
            "https://h:port",
            "https://h/a b",
            "https://[::1",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn documents_must_be_objects() {
        assert_eq!(
            Value::Object(read_document("{\"a\": 1}", "desired state").unwrap()),
            json!({"a": 1})
        );
        let err = read_document("[1]", "desired state").unwrap_err();
        assert_eq!(
            err.to_string(),
            "desired state: a state document must be a JSON object, got an array"
        );
        let err = read_document("@/nonexistent/devsync.json", "desired state").unwrap_err();
        assert!(
            format!("{err:#}").starts_with("read desired state from \"/nonexistent/devsync.json\""),
            "{err:#}"
        );
    }
}
