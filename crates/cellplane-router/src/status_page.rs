//! The status page: one server-rendered HTML document on the router's HTTP port
//! (`/`), from the same [`RouterStatusResponse`] `cellplane status` prints, plus
//! the moves in progress read from the directory. No script and no external
//! asset: it renders where nothing but this port is reachable, and refreshes
//! itself every few seconds with a `<meta>` tag.

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_proto::router::{CellStatus, MemberStatus, RouterStatusResponse};

use crate::directory::{Directory, MoveView};

/// Seconds between the page's own reloads.
const REFRESH_SECS: u32 = 5;

/// How long one read of the moves serves the page.
const MOVES_TTL: Duration = Duration::from_secs(3);

/// The moves in progress as the page shows them, read from the directory at most
/// once per [`MOVES_TTL`] however often the page loads: pages that load while a
/// read is in flight wait for it rather than send their own, so the page cannot
/// turn into load on the directory.
pub struct MovesCache {
    /// A client of its own: the page's reads never queue with the map's.
    directory: Directory,
    last: tokio::sync::Mutex<Option<(Instant, Arc<Moves>)>>,
}

impl MovesCache {
    pub fn new(directory: Directory) -> MovesCache {
        MovesCache {
            directory,
            last: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn get(&self) -> Arc<Moves> {
        let mut last = self.last.lock().await;
        if let Some((at, moves)) = &*last
            && at.elapsed() < MOVES_TTL
        {
            return moves.clone();
        }
        let moves = Arc::new(match self.directory.moves().await {
            Ok((list, more)) => Moves::Listed(list, more),
            Err(e) => Moves::Unknown(e.to_string()),
        });
        *last = Some((Instant::now(), moves.clone()));
        moves
    }
}

/// What the page knows of moves in progress.
pub enum Moves {
    /// The records found, and whether there were more than listed.
    Listed(Vec<MoveView>, bool),
    /// The directory did not answer: why.
    Unknown(String),
}

/// `text` with the five HTML-special characters escaped.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}\
table{border-collapse:collapse;margin:.5em 0}\
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}\
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.ok{color:#176317}.bad{color:#a31515;font-weight:bold}.warn{color:#8a5a00}\
.cell{border:1px solid #ddd;border-radius:4px;padding:.2em 1em;margin:1em 0}";

/// The whole page.
pub fn render(router_id: u64, s: &RouterStatusResponse, moves: &Moves) -> String {
    let mut out = String::with_capacity(8 << 10);
    let _ = write!(
        out,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>cellplane router {router_id}</title><style>{STYLE}</style></head><body>\
         <h1>cellplane router {router_id}</h1>"
    );
    summary(&mut out, s);
    let _ = write!(out, "<h2>Cells</h2>");
    for cell in &s.cells {
        cell_section(&mut out, cell);
    }
    moves_section(&mut out, moves);
    let _ = writeln!(
        out,
        "<p>Reloads every {REFRESH_SECS} s. Rates are over the time since the previous \
         status read (this page or <code>cellplane status</code>); p99 over the last \
         10–20 s. Metrics: <a href=\"/metrics\">/metrics</a>.</p></body></html>"
    );
    out
}

fn summary(out: &mut String, s: &RouterStatusResponse) {
    let source = if s.map_source == "directory" {
        format!("<span class=\"ok\">{}</span>", esc(&s.map_source))
    } else {
        format!(
            "<span class=\"warn\">{}</span> (not the directory's)",
            esc(&s.map_source)
        )
    };
    let directory = if s.directory_reachable {
        "<span class=\"ok\">reachable</span>".to_string()
    } else {
        format!(
            "<span class=\"bad\">unreachable for {:.1} s</span>: routing continues with the \
             map in force",
            s.directory_unreachable_ms as f64 / 1000.0
        )
    };
    let _ = write!(
        out,
        "<table id=\"summary\"><tr><th>Map version</th><td id=\"map-version\">{}</td></tr>\
         <tr><th>Map source</th><td id=\"map-source\">{source}</td></tr>\
         <tr><th>Directory</th><td>{directory}</td></tr>\
         <tr><th>Maps refused</th><td>{}{}</td></tr>\
         <tr><th>Auth</th><td>{}</td></tr><tr><th>TLS</th><td>{}</td></tr></table>",
        s.map_version,
        s.maps_refused_total,
        if s.last_refused_map.is_empty() {
            String::new()
        } else {
            format!(" (last: {})", esc(&s.last_refused_map))
        },
        if s.auth_enabled { "on" } else { "off" },
        if s.tls { "on" } else { "off" },
    );
}

fn cell_section(out: &mut String, c: &CellStatus) {
    let name = esc(&c.name);
    let total = c.members.len();
    // Quorum is about votes: an ejected member still votes if it is reachable.
    // Serving is about this router: it sends calls only to the unejected.
    let reachable = c.members.iter().filter(|m| m.healthy).count();
    let serving = c.members.iter().filter(|m| m.healthy && !m.ejected).count();
    let quorum = total / 2 + 1;
    let health = if reachable < quorum {
        format!(
            "<span class=\"bad\">{reachable} of {total} members reachable: below quorum \
             ({quorum})</span>; {serving} serve"
        )
    } else if c.leader_id == 0 {
        format!("<span class=\"bad\">no leader known</span>; {serving} of {total} members serve")
    } else if serving < total {
        format!("<span class=\"warn\">{serving} of {total} members serve</span>")
    } else {
        format!("<span class=\"ok\">{serving} of {total} members serve</span>")
    };
    let state = if c.state == "active" {
        esc(&c.state)
    } else {
        format!("<span class=\"warn\">{}</span>", esc(&c.state))
    };
    let _ = write!(
        out,
        "<div class=\"cell\" id=\"cell-{name}\"><h3>{name}</h3>\
         <p>State: {state}. Leader: {}. {health}.</p>\
         <table><tr><th>requests/s</th><th>errors/s</th><th>p99 (ms)</th>\
         <th>requests</th><th>errors</th><th>shed</th></tr>\
         <tr><td class=\"n\">{:.1}</td><td class=\"n\">{:.1}</td><td class=\"n\">{:.2}</td>\
         <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr></table>\
         <table><tr><th>member</th><th>endpoint</th><th>health</th><th>latency (ms)</th>\
         <th>probe (ms)</th><th>in flight</th><th>failures in a row</th>\
         <th>applied index</th><th>ejections</th></tr>",
        if c.leader_id == 0 {
            "none".to_string()
        } else {
            format!("member {}", c.leader_id)
        },
        c.requests_per_sec,
        c.errors_per_sec,
        c.p99_ms,
        c.requests_total,
        c.errors_total,
        c.shed_total,
    );
    for m in &c.members {
        member_row(out, m, c.leader_id);
    }
    let _ = write!(out, "</table></div>");
}

fn member_row(out: &mut String, m: &MemberStatus, leader: u64) {
    let health = if m.ejected {
        format!(
            "<span class=\"bad\">ejected: {}</span>",
            esc(&m.ejection_reason)
        )
    } else if m.healthy {
        "<span class=\"ok\">serving</span>".to_string()
    } else {
        "<span class=\"bad\">unreachable</span>".to_string()
    };
    let id = match m.member_id {
        0 => "?".to_string(),
        id if id == leader => format!("{id} (leader)"),
        id => id.to_string(),
    };
    let _ = write!(
        out,
        "<tr><td>{id}</td><td>{}</td><td>{health}</td><td class=\"n\">{:.2}</td>\
         <td class=\"n\">{:.2}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
         <td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
        esc(&m.endpoint),
        m.latency_ms,
        m.probe_ms,
        m.pending,
        m.failures_in_a_row,
        m.applied_index,
        m.ejections_total,
    );
}

fn moves_section(out: &mut String, moves: &Moves) {
    let _ = write!(out, "<h2>Moves in progress</h2>");
    match moves {
        Moves::Unknown(why) => {
            let _ = write!(
                out,
                "<p id=\"moves\" class=\"warn\">Unknown: {}</p>",
                esc(why)
            );
        }
        Moves::Listed(list, _) if list.is_empty() => {
            let _ = write!(out, "<p id=\"moves\">None.</p>");
        }
        Moves::Listed(list, more) => {
            let _ = write!(
                out,
                "<table id=\"moves\"><tr><th>tenant</th><th>from</th><th>to</th>\
                 <th>step</th></tr>"
            );
            for m in list {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&m.tenant),
                    esc(&m.from),
                    esc(&m.to),
                    esc(&m.state)
                );
            }
            let _ = write!(out, "</table>");
            if *more {
                let _ = write!(
                    out,
                    "<p>More moves than listed: <code>cellplane move</code> lists them all.</p>"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_network_are_escaped() {
        let s = RouterStatusResponse {
            map_version: 7,
            map_source: "static".into(),
            cells: vec![CellStatus {
                name: "a<b>".into(),
                state: "draining".into(),
                members: vec![MemberStatus {
                    endpoint: "x\"y".into(),
                    ejected: true,
                    ejection_reason: "<script>".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let moves = Moves::Listed(
            vec![MoveView {
                tenant: "t&1".into(),
                from: "a".into(),
                to: "b".into(),
                state: "copying".into(),
            }],
            false,
        );
        let html = render(1, &s, &moves);
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("ejected: &lt;script&gt;"));
        assert!(html.contains("a&lt;b&gt;") && html.contains("x&quot;y"));
        assert!(html.contains("<td>t&amp;1</td>"));
        assert!(html.contains("0 of 1 members reachable: below quorum"));
        assert!(html.contains("not the directory's"));
    }
}
