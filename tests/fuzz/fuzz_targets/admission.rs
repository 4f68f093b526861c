//! The webhook request handler on arbitrary bytes: it must answer every input with a 2xx
//! admission decision or a 4xx, never panic and never a 5xx.
#![no_main]

use capl::libvirt::uri::UriPolicy;
use capl::webhook::admission::{AdmissionPolicy, Endpoint, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let kind = Kind::ALL[usize::from(selector % 4)];
    let endpoint = if selector & 4 == 0 { Endpoint::Mutate } else { Endpoint::Validate };
    let policy = AdmissionPolicy {
        uri: UriPolicy {
            allow_test_driver: selector & 8 != 0,
        },
    };
    let status = capl::webhook::server::handle(kind, endpoint, body, &policy).status();
    assert!(
        status.is_success() || status.is_client_error(),
        "{status} for {kind:?} {endpoint:?}"
    );
});
