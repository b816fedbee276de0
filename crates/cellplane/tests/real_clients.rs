//! Real etcd clients against a cell: Debian's `etcdctl` (3.4) and the Rust
//! `etcd-client` crate. `scripts/setup.sh` installs etcdctl.

mod common;

use std::time::Duration;

use common::{TestCell, etcdctl};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_works_against_a_cell() {
    let cell = TestCell::start(3);
    cell.leader(Duration::from_secs(30)).await;
    // All members as endpoints, as users give them; etcdctl picks any.
    let eps: Vec<String> = cell.members.iter().map(|m| m.client.to_string()).collect();
    let all = eps.join(",");
    // And each member alone, to show followers serve everything too.
    for ep in &eps {
        let (ok, out) = etcdctl(ep, &["put", "/etcdctl/one", "1"], None);
        assert!(ok && out.trim() == "OK", "{out}");
    }

    let (ok, out) = etcdctl(&all, &["put", "foo", "bar"], None);
    assert!(ok && out.trim() == "OK", "{out}");
    let (ok, out) = etcdctl(&all, &["get", "foo"], None);
    assert!(ok, "{out}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["foo", "bar"]);

    // --rev: the value at an older revision.
    let (ok, out) = etcdctl(&all, &["get", "foo", "-w", "json"], None);
    assert!(ok, "{out}");
    let rev = json_field(&out, "mod_revision");
    etcdctl(&all, &["put", "foo", "baz"], None);
    let (ok, out) = etcdctl(&all, &["get", "foo", &format!("--rev={rev}")], None);
    assert!(ok, "{out}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["foo", "bar"]);

    // --prefix.
    for k in ["/pre/a", "/pre/b", "/prz"] {
        etcdctl(&all, &["put", k, "v"], None);
    }
    let (ok, out) = etcdctl(&all, &["get", "--prefix", "/pre/", "--keys-only"], None);
    assert!(ok, "{out}");
    let keys: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(keys, ["/pre/a", "/pre/b"]);

    // del.
    let (ok, out) = etcdctl(&all, &["del", "--prefix", "/pre/"], None);
    assert!(ok && out.trim() == "2", "{out}");
    let (ok, out) = etcdctl(&all, &["get", "--prefix", "/pre/"], None);
    assert!(ok && out.trim().is_empty(), "{out}");

    // txn, as etcdctl reads it from stdin: compares, success ops, failure ops.
    let (ok, out) = etcdctl(
        &all,
        &["txn"],
        Some("value(\"foo\") = \"baz\"\n\nput foo cas-won\n\nput foo cas-lost\n\n"),
    );
    assert!(ok, "{out}");
    assert!(out.starts_with("SUCCESS"), "{out}");
    let (ok, out) = etcdctl(
        &all,
        &["txn"],
        Some("value(\"foo\") = \"baz\"\n\nput foo x\n\nget foo\n\n"),
    );
    assert!(ok, "{out}");
    assert!(
        out.starts_with("FAILURE") && out.contains("cas-won"),
        "{out}"
    );

    // endpoint status: one line per member, exactly one leader.
    let (ok, out) = etcdctl(&all, &["endpoint", "status"], None);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        lines.iter().filter(|l| l.contains(", true, ")).count(),
        1,
        "{out}"
    );

    // member list: every member with its URLs.
    let (ok, out) = etcdctl(&all, &["member", "list"], None);
    assert!(ok, "{out}");
    for m in &cell.members {
        assert!(out.contains(&format!("http://{}", m.client)), "{out}");
        assert!(out.contains(&format!("http://{}", m.peer)), "{out}");
    }

    // Errors come back as etcd's: a compacted revision.
    let (ok, out) = etcdctl(&all, &["compact", &rev.to_string()], None);
    assert!(ok, "{out}");
    let (ok, out) = etcdctl(&all, &["get", "foo", &format!("--rev={}", rev - 1)], None);
    assert!(
        !ok && out.contains("required revision has been compacted"),
        "{out}"
    );
}

fn json_field(json: &str, field: &str) -> i64 {
    let at = json
        .find(&format!("\"{field}\":"))
        .unwrap_or_else(|| panic!("{field} in {json}"));
    json[at + field.len() + 3..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_etcd_client_works_against_a_cell() {
    use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
    let cell = TestCell::start(3);
    cell.leader(Duration::from_secs(30)).await;
    let mut client = Client::connect(cell.all_endpoints(), None).await.unwrap();
    client.put("/rc/a", "1", None).await.unwrap();
    let r = client
        .put("/rc/a", "2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(r.prev_key().unwrap().value(), b"1");
    client.put("/rc/b", "3", None).await.unwrap();
    let r = client
        .get("/rc/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(r.count(), 2);
    assert_eq!(r.kvs()[0].value(), b"2");
    assert_eq!(r.kvs()[0].version(), 2);
    let r = client
        .txn(
            Txn::new()
                .when([Compare::value("/rc/a", CompareOp::Equal, "2")])
                .and_then([TxnOp::put("/rc/a", "3", None)])
                .or_else([TxnOp::get("/rc/a", None)]),
        )
        .await
        .unwrap();
    assert!(r.succeeded());
    let r = client
        .delete(
            "/rc/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(r.deleted(), 2);
    let s = client.status().await.unwrap();
    assert!(s.leader() != 0 && s.raft_term() >= 1);
    let m = client.member_list().await.unwrap();
    assert_eq!(m.members().len(), 3);
}
