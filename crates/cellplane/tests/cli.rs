//! The CLI's answers to bad input: a message naming the problem and a non-zero exit.

mod common;

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(common::bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn malformed_cell_definition_names_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "name = \"x\"\n[[members]]\nid = 1\nclient = \"127.0.0.1:1\"\npeer = \"127.0.0.1:2\"\nhttp = \"127.0.0.1:3\"\n[limits]\nmax_txn_ops = 0\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (code, out) = run(&[
        "node",
        "--cell",
        p,
        "--id",
        "1",
        "--data-dir",
        dir.path().join("d").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        out.contains("bad.toml") && out.contains("limits.max_txn_ops"),
        "{out}"
    );

    // The discovery settings are checked the same way.
    std::fs::write(
        &path,
        "name = \"x\"\n[[members]]\nid = 1\nclient = \"127.0.0.1:1\"\npeer = \"127.0.0.1:2\"\nhttp = \"127.0.0.1:3\"\n[discovery]\nttl_poll_ms = 0\n",
    )
    .unwrap();
    let (code, out) = run(&[
        "node",
        "--cell",
        p,
        "--id",
        "1",
        "--data-dir",
        dir.path().join("d").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        out.contains("bad.toml") && out.contains("discovery.ttl_poll_ms"),
        "{out}"
    );

    std::fs::write(&path, "name = \"x\"\nmembers = 3\n").unwrap();
    let (code, out) = run(&[
        "node",
        "--cell",
        p,
        "--id",
        "1",
        "--data-dir",
        "/tmp/unused",
    ]);
    assert_ne!(code, 0);
    assert!(out.contains("bad.toml") && out.contains("members"), "{out}");
}

#[test]
fn unknown_member_id_and_missing_file_are_refused() {
    let cells = concat!(env!("CARGO_MANIFEST_DIR"), "/../../cells/alpha.toml");
    let (code, out) = run(&[
        "node",
        "--cell",
        cells,
        "--id",
        "9",
        "--data-dir",
        "/tmp/unused",
    ]);
    assert_ne!(code, 0);
    assert!(
        out.contains("no member 9") && out.contains("1, 2, 3"),
        "{out}"
    );
    let (code, out) = run(&[
        "node",
        "--cell",
        "/nonexistent/cell.toml",
        "--id",
        "1",
        "--data-dir",
        "/tmp/unused",
    ]);
    assert_ne!(code, 0);
    assert!(out.contains("/nonexistent/cell.toml"), "{out}");
    let (code, out) = run(&["status", "--admin", "127.0.0.1:1"]);
    assert_ne!(code, 0);
    assert!(out.contains("127.0.0.1:1"), "{out}");
}

/// `cellplane status | head`: a reader that goes away ends the command quietly
/// (exit 0, no panic about a broken pipe).
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let out_dir = tempfile::tempdir().unwrap();
    let cells = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cells");
    let mut child = Command::new(common::bin())
        .args(["deploy", "render", "compose", "--cells"])
        .arg(&cells)
        .arg("--out")
        .arg(out_dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the command writes.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
