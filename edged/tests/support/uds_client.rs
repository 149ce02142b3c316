//! A tiny static HTTP/1.1 client over a Unix socket, built by the edged tests with
//! `rustc -C target-feature=+crt-static` and copied into the test image (a `FROM scratch` image
//! with busybox, whose `nc` cannot speak to Unix sockets). It runs inside module containers
//! through `docker exec`, so edged sees a caller pid that belongs to the container.
//!
//! usage: uds-client SOCKET METHOD PATH [BODY]  → prints the raw HTTP response to stdout.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: uds-client SOCKET METHOD PATH [BODY]");
        std::process::exit(2);
    }
    let body = args.get(4).cloned().unwrap_or_default();
    let mut stream = match UnixStream::connect(&args[1]) {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!("cannot connect to {}: {error}", args[1]);
            std::process::exit(3);
        }
    };
    let request = format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        args[2],
        args[3],
        body.len(),
        body
    );
    if let Err(error) = stream.write_all(request.as_bytes()) {
        eprintln!("cannot send: {error}");
        std::process::exit(4);
    }
    let mut response = Vec::new();
    if let Err(error) = stream.read_to_end(&mut response) {
        eprintln!("cannot receive: {error}");
        std::process::exit(5);
    }
    let _ = std::io::stdout().write_all(&response);
}
