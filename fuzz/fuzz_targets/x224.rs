//! Fuzz target for the front door's X.224 Connection Request parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsagent::front_door::x224::{Parsed, X224Error, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Parsed::Complete(req)) => {
            // The request lies within the buffer and does not depend on what follows it.
            assert!(req.packet_len <= data.len());
            assert_eq!(
                parse(&data[..req.packet_len]),
                Ok(Parsed::Complete(req.clone()))
            );
        }
        Ok(Parsed::NeedMore { at_least }) => assert!(at_least > data.len()),
        Err(X224Error::TooLarge(len)) => assert!(len > tsagent::front_door::x224::MAX_REQUEST_LEN),
        Err(_) => {}
    }
});
