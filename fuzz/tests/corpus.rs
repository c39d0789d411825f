//! Replays every committed seed (and any crash reproducer saved under
//! `artifacts/`) through its harness, without libFuzzer: `cargo test` here
//! works on the stable toolchain.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in [
        root.join("corpus").join(target),
        root.join("artifacts").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let data = std::fs::read(&p).unwrap();
            eprintln!("{target}: {}", p.display());
            run(&data);
            n += 1;
        }
    }
    assert!(n > 0 || target == "none", "no seeds for {target}");
}

#[test]
fn session_to_server() {
    replay("session_to_server", nbdfault_fuzz::session::to_server);
}

#[test]
fn session_to_client() {
    replay("session_to_client", nbdfault_fuzz::session::to_client);
}

#[test]
fn session_both() {
    replay("session_both", nbdfault_fuzz::session::both);
}

#[test]
fn wire_headers() {
    replay("wire_headers", nbdfault_fuzz::wire::headers);
}

#[test]
fn rules_yaml() {
    replay("rules_yaml", nbdfault_fuzz::rules::yaml);
}

#[test]
fn rules_ini() {
    replay("rules_ini", nbdfault_fuzz::rules::ini);
}
