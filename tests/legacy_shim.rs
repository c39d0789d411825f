//! `contrib/nbd-fault-injector.py`, the stand-in QEMU's iotests run as
//! `$PYTHON nbd-fault-injector.py ARGS`, really runs nbdfault in injector
//! mode: usage under the script's name, and a 083 case end to end.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn shim() -> String {
    format!(
        "{}/contrib/nbd-fault-injector.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn usage_names_the_script() {
    let out = Command::new("python3")
        .arg(shim())
        .env("NBDFAULT", nbdfault_bin())
        .output()
        .expect("python3");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err,
        format!(
            "usage: {} [--classic-negotiation] <tcp-port>|<unix-path> <config-file>\nRun an fault injector NBD server with rules defined in a config file.\n",
            shim()
        )
    );
}

#[test]
fn qemu_083_neg2_case_through_the_shim() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nbd-fault-injector.conf");
    std::fs::write(&conf, "[inject-error]\nevent=neg2\nwhen=8\n").unwrap();
    let mut inj = Command::new("python3")
        .arg(shim())
        .arg("127.0.0.1:0")
        .arg(&conf)
        .env("NBDFAULT", nbdfault_bin())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(inj.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("Listening on ")
        .expect(&line)
        .to_string();
    let q = qemu_io(&format!("nbd://{addr}/foo"), &["read 0 512"]);
    assert_eq!(q.status.code(), Some(1));
    assert!(q.stderr.contains("can't open device"), "{}", q.describe());
    let mut rest = String::new();
    out.read_line(&mut rest).unwrap();
    assert_eq!(rest, "Closing connection on rule match inject-error\n");
    assert!(wait_until(Duration::from_secs(5), || matches!(
        inj.try_wait(),
        Ok(Some(_))
    )));
    assert_eq!(inj.wait().unwrap().code(), Some(0));
}
