//! Fuzzes the checks every device message gets before anything else touches it: subject,
//! size, kind, protobuf decode, identity, content. Any panic is a bug; a refusal must name
//! its reason.

#![no_main]

use libfuzzer_sys::fuzz_target;

const KINDS: [&str; 5] = ["report", "ack", "checkin", "refresh", "firmware"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let kind = KINDS[usize::from(selector) % KINDS.len()];
    let device = devsync_types::DeviceId::parse("fuzz-device").expect("a valid id");
    let subject = devsync_types::subjects::ingress_token(&device, kind);
    if let Err((_, reason)) = devsync_requestor::ingress::check_message(&subject, payload, 64 * 1024) {
        assert!(!reason.is_empty(), "a refusal names its reason");
    }
});
