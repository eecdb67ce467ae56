//! Typed identifiers. Each is parsed once at the edge; holding one proves it is well-formed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 128;
/// Longest accepted request id, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 200;

/// Why an id was refused. The message names the offending input so a device maker or an
/// operator can fix it without reading code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error(
        "{kind} {value:?} contains {found:?} at byte {index}; only ASCII letters, digits, '-' and '_' are allowed"
    )]
    BadChar {
        kind: &'static str,
        value: String,
        found: char,
        index: usize,
    },
    #[error("worker id {value:?} must look like <service>/<instance>")]
    BadWorker { value: String },
}

/// Checks `value` is 1..=`max` bytes of `[A-Za-z0-9_-]`: safe as one NATS subject token (no
/// dots, wildcards, whitespace or control characters), as a KV key and as a file name.
fn check_token(kind: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong {
            kind,
            len: value.len(),
            max,
        });
    }
    if let Some((index, found)) = value
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(IdError::BadChar {
            kind,
            value: value.to_owned(),
            found,
            index,
        });
    }
    Ok(())
}

/// A device's identity: one NATS subject token of at most 128 bytes of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    /// Parses a device id.
    pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        check_token("device id", &value, MAX_DEVICE_ID_LEN)?;
        Ok(Self(value))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for DeviceId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> Self {
        id.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Identifies one request through every hop. New requests get a UUIDv7 (time-ordered);
/// device messages get an id derived from the device and its own sequence number, so a
/// device's retry carries the same id and is deduplicated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RequestId(String);

impl RequestId {
    /// A fresh, time-ordered request id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// The deterministic id of message `sequence` of `kind` from `device`.
    pub fn for_device_message(device: &DeviceId, kind: super::MessageKind, sequence: u64) -> Self {
        Self(format!("{}:{}:{}", kind.as_str(), device, sequence))
    }

    /// Parses a request id: 1..=200 printable ASCII characters without whitespace.
    pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        if value.is_empty() {
            return Err(IdError::Empty { kind: "request id" });
        }
        if value.len() > MAX_REQUEST_ID_LEN {
            return Err(IdError::TooLong {
                kind: "request id",
                len: value.len(),
                max: MAX_REQUEST_ID_LEN,
            });
        }
        if let Some((index, found)) = value.char_indices().find(|(_, c)| !c.is_ascii_graphic()) {
            return Err(IdError::BadChar {
                kind: "request id",
                value,
                found,
                index,
            });
        }
        Ok(Self(value))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RequestId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<RequestId> for String {
    fn from(id: RequestId) -> Self {
        id.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A campaign's identity (same alphabet as device ids, so it fits in a subject).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CampaignId(String);

impl CampaignId {
    /// Parses a campaign id.
    pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        check_token("campaign id", &value, MAX_DEVICE_ID_LEN)?;
        Ok(Self(value))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CampaignId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<CampaignId> for String {
    fn from(id: CampaignId) -> Self {
        id.0
    }
}

impl fmt::Display for CampaignId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The devsync programs that act and therefore appear as workers in the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceName {
    Requestor,
    Reconciler,
    Fanout,
    Audit,
    Ctl,
    Sim,
}

impl ServiceName {
    /// The service's name as used in worker ids, subjects and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requestor => "requestor",
            Self::Reconciler => "reconciler",
            Self::Fanout => "fanout",
            Self::Audit => "audit",
            Self::Ctl => "ctl",
            Self::Sim => "sim",
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "requestor" => Self::Requestor,
            "reconciler" => Self::Reconciler,
            "fanout" => Self::Fanout,
            "audit" => Self::Audit,
            "ctl" => Self::Ctl,
            "sim" => Self::Sim,
            _ => {
                return Err(IdError::BadWorker {
                    value: s.to_owned(),
                });
            }
        })
    }
}

/// Which worker did something: `<service>/<instance>`, e.g. `reconciler/reconciler-7f9c-2`.
/// The instance is the pod name in Kubernetes, or host name and pid elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkerId {
    service: ServiceName,
    instance: String,
}

impl WorkerId {
    /// A worker id for `instance` of `service`; the instance must be a valid token.
    pub fn new(service: ServiceName, instance: impl Into<String>) -> Result<Self, IdError> {
        let instance = instance.into();
        check_token("worker instance", &instance, MAX_DEVICE_ID_LEN)?;
        Ok(Self { service, instance })
    }

    /// The service part.
    pub fn service(&self) -> ServiceName {
        self.service
    }

    /// The instance part.
    pub fn instance(&self) -> &str {
        &self.instance
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.instance)
    }
}

impl FromStr for WorkerId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (service, instance) = s.split_once('/').ok_or_else(|| IdError::BadWorker {
            value: s.to_owned(),
        })?;
        Self::new(service.parse()?, instance)
    }
}

impl TryFrom<String> for WorkerId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<WorkerId> for String {
    fn from(id: WorkerId) -> Self {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_accepts_tokens() {
        for ok in ["a", "dev-001", "Sensor_42", &"x".repeat(MAX_DEVICE_ID_LEN)] {
            assert_eq!(DeviceId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn device_id_rejects_unsafe_input_with_a_clear_message() {
        let cases: [(&str, &str); 8] = [
            ("", "device id is empty"),
            ("a.b", "contains '.' at byte 1"),
            ("a*", "contains '*' at byte 1"),
            (">", "contains '>' at byte 0"),
            ("a b", "contains ' ' at byte 1"),
            ("tab\t", "contains '\\t' at byte 3"),
            ("dev$", "contains '$' at byte 3"),
            ("é", "contains 'é' at byte 0"),
        ];
        for (input, expected) in cases {
            let err = DeviceId::parse(input).unwrap_err().to_string();
            assert!(err.contains(expected), "{input:?}: {err}");
        }
        let long = "x".repeat(MAX_DEVICE_ID_LEN + 1);
        assert_eq!(
            DeviceId::parse(long).unwrap_err().to_string(),
            "device id is 129 bytes long; at most 128 are allowed"
        );
    }

    #[test]
    fn device_id_deserialization_validates() {
        assert!(serde_json::from_str::<DeviceId>("\"ok-1\"").is_ok());
        let err = serde_json::from_str::<DeviceId>("\"no.dots\"").unwrap_err();
        assert!(err.to_string().contains("'.'"), "{err}");
    }

    #[test]
    fn worker_id_round_trips() {
        let w: WorkerId = "reconciler/pod-1".parse().unwrap();
        assert_eq!(w.service(), ServiceName::Reconciler);
        assert_eq!(w.to_string(), "reconciler/pod-1");
        assert!("nobody/pod".parse::<WorkerId>().is_err());
        assert!("reconciler".parse::<WorkerId>().is_err());
        assert!("reconciler/a.b".parse::<WorkerId>().is_err());
    }

    #[test]
    fn request_ids() {
        let dev = DeviceId::parse("d1").unwrap();
        let a = RequestId::for_device_message(&dev, crate::MessageKind::Report, 7);
        assert_eq!(a.as_str(), "report:d1:7");
        assert_ne!(RequestId::generate(), RequestId::generate());
        assert!(RequestId::parse("has space").is_err());
        assert!(RequestId::parse("").is_err());
    }
}
