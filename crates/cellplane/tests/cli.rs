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
