//! Shows how one input frames, for triage and for checking seeds:
//!
//!   cargo run --example show -- session_to_client corpus/session_to_client/FILE
//!
//! Prints the whole-buffer run's log (frames, peer answers, proxy actions)
//! and how it ended, then runs the harness itself (which panics on a
//! finding, with its message).

use nbdfault_fuzz::session;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, target, file] = &args[..] else {
        eprintln!("usage: show TARGET FILE");
        std::process::exit(2);
    };
    let data = std::fs::read(file).expect("read input");
    let run: fn(&[u8]) = match target.as_str() {
        "session_to_server" => session::to_server,
        "session_to_client" => session::to_client,
        "session_both" => session::both,
        "wire_headers" => nbdfault_fuzz::wire::headers,
        "rules_yaml" => nbdfault_fuzz::rules::yaml,
        "rules_ini" => nbdfault_fuzz::rules::ini,
        t => panic!("unknown target {t}"),
    };
    if target.starts_with("session_") {
        let o = session::describe(target, &data);
        for l in &o.log {
            println!("{l:?}");
        }
        println!("failed: {:?}", o.failed);
        println!(
            "mode {:?}, in transmission {}, inflight {}, pending {:?}",
            o.mode,
            o.in_transmission,
            o.inflight,
            o.pending
                .as_ref()
                .map(|p| (p[0].0.len(), p[0].1, p[1].0.len(), p[1].1))
        );
    }
    run(&data);
    println!("harness: ok");
}
