#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluicegate::fuzzing::callback_url_and_duration(data));
