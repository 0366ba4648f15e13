#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluicegate::fuzzing::h1_request(data));
