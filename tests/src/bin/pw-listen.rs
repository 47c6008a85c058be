//! Test helper: a process with a hostile name that listens. Sets its comm from the hex
//! in `PW_COMM_HEX` (prctl PR_SET_NAME: any bytes but NUL, 15 at most), listens on
//! 127.0.0.1:0, prints the port, and exits when its stdin closes. Its argv is whatever
//! the test gave it.

use std::{io::Read as _, net::TcpListener};

fn main() {
    if let Ok(hex) = std::env::var("PW_COMM_HEX") {
        let mut name: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        name.push(0);
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        let rc = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
        assert_eq!(rc, 0, "prctl(PR_SET_NAME)");
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    println!("{}", l.local_addr().expect("local_addr").port());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
