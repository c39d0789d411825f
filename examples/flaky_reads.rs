//! Flaky reads in front of a real disk, from Rust: qemu-nbd serves a
//! fresh 1 MiB image, an in-process nbdfault proxy fails about one read
//! in four with EIO (seeded, so every run fails the same reads), and
//! qemu-io reads the disk in 16 pieces. Prints what qemu-io saw, then the
//! rule's counters. Needs qemu-img, qemu-nbd and qemu-io on PATH.
//!
//! Run with `cargo run --release --example flaky_reads`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RULES: &str = "\
seed: 1
rules:
  - name: flaky-reads
    event: request
    command: read
    probability: 0.25
    action: error
    errno: EIO
";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("flaky-reads-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("disk.img");
    let socket = dir.join("qemu-nbd.sock");
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&image)
        .arg("1M")
        .status()?;
    assert!(created.success(), "qemu-img create failed");
    let mut qemu_nbd = Command::new("qemu-nbd")
        .args(["-f", "raw", "--persistent", "-k"])
        .arg(&socket)
        .arg(&image)
        .stdout(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }

    let proxy = nbdfault::Proxy::builder()
        .upstream(socket.display().to_string())
        .rules_yaml(RULES)
        .spawn()?;
    let mut qemu_io = Command::new("qemu-io");
    qemu_io.args(["-f", "raw"]);
    for i in 0..16 {
        // -q: no timing line, so a read that works prints nothing.
        qemu_io.args(["-c", &format!("read -q {}k 64k", i * 64)]);
    }
    let out = qemu_io.arg(proxy.uri()).output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    for rule in proxy.rules() {
        println!(
            "{}: matched {} reads, failed {}",
            rule.name, rule.matched, rule.fired
        );
    }

    proxy.shutdown()?;
    qemu_nbd.kill()?;
    qemu_nbd.wait()?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
