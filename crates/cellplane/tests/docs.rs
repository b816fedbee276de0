//! The docs check: the documentation cannot drift from the repository or the CLI.
//!
//! - Every relative link in `README.md`, `docs/`, `deploy/` and `loadgen/` Markdown
//!   resolves to a file or folder of the repository, and every `#anchor` into a
//!   Markdown file names one of its headings (GitHub's heading ids).
//! - Every `cellplane` command in a runnable code block (fenced as `sh`, `bash` or
//!   `shell`; `text` blocks are illustrative and not checked) parses against the real
//!   CLI: the command is run with `--help` appended, which clap answers only if every
//!   subcommand, flag and value before it is one it accepts. The command is never run
//!   itself, so the check is fast and needs no environment.
//!
//! A command is a `cellplane` invocation however the docs spell it: `cellplane …`,
//! `cargo run --release [-p cellplane] -- …`, or a path ending in `/release/cellplane`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// README.md and every Markdown file under the documented folders.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    let root = repo();
    let mut files = vec![root.join("README.md")];
    for dir in ["docs", "deploy", "loadgen"] {
        walk(&root.join(dir), &mut files);
    }
    files.sort();
    files
}

fn rel(p: &Path) -> String {
    let root = repo().canonicalize().unwrap();
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    p.strip_prefix(&root)
        .map(|r| r.display().to_string())
        .unwrap_or_else(|_| p.display().to_string())
}

/// A fenced code block: its info string, and its lines with their line numbers.
struct Block {
    info: String,
    lines: Vec<(usize, String)>,
}

/// Splits a Markdown file into prose lines (with numbers) and fenced blocks.
fn parse(text: &str) -> (Vec<(usize, String)>, Vec<Block>) {
    let mut prose = Vec::new();
    let mut blocks = Vec::new();
    let mut open: Option<(String, Block)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = line.trim_start();
        let fence = ["```", "~~~"].into_iter().find(|f| trimmed.starts_with(f));
        let closes = matches!(&open, Some((f, _)) if trimmed.trim_end() == f);
        match (&mut open, fence) {
            (Some(_), _) if closes => {
                if let Some((_, b)) = open.take() {
                    blocks.push(b);
                }
            }
            (Some((_, b)), _) => b.lines.push((n, line.to_string())),
            (None, Some(f)) => {
                let ticks: String = trimmed.chars().take_while(|c| f.starts_with(*c)).collect();
                let info = trimmed[ticks.len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                open = Some((
                    ticks,
                    Block {
                        info,
                        lines: Vec::new(),
                    },
                ));
            }
            (None, None) => prose.push((n, line.to_string())),
        }
    }
    (prose, blocks)
}

/// Removes inline code spans: a link inside backticks is text, not a link.
fn strip_code_spans(line: &str) -> String {
    let mut out = String::new();
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
        } else if !in_code {
            out.push(c);
        }
    }
    out
}

/// Link targets of one prose line: inline `[text](target)` and `![alt](target)`,
/// and reference definitions `[label]: target`.
fn link_targets(line: &str) -> Vec<String> {
    let line = strip_code_spans(line);
    let mut out = Vec::new();
    let t = line.trim_start();
    if t.starts_with('[')
        && let Some(close) = t.find("]:")
    {
        if let Some(target) = t[close + 2..].split_whitespace().next() {
            out.push(target.trim_matches(|c| c == '<' || c == '>').to_string());
        }
        return out;
    }
    let mut rest = line.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        let target = after[..end].split_whitespace().next().unwrap_or("");
        out.push(target.trim_matches(|c| c == '<' || c == '>').to_string());
        rest = &after[end..];
    }
    out
}

/// GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The heading ids of a Markdown file, with GitHub's `-1`, `-2` suffixes for
/// repeated headings.
fn anchors(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (prose, _) = parse(&text);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose {
        let t = line.trim_start();
        if !t.starts_with('#') {
            continue;
        }
        let level = t.chars().take_while(|c| *c == '#').count();
        if level > 6 || !t[level..].starts_with(' ') {
            continue;
        }
        let base = slug(&t[level..]);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

#[test]
fn every_relative_link_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let (prose, _) = parse(&text);
        let dir = file.parent().unwrap();
        for (n, line) in prose {
            for target in link_targets(&line) {
                if target.is_empty()
                    || target.contains("://")
                    || target.starts_with("mailto:")
                    || target.starts_with('/')
                {
                    continue;
                }
                checked += 1;
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let resolved = if path.is_empty() {
                    file.clone()
                } else {
                    dir.join(path)
                };
                if !resolved.exists() {
                    broken.push(format!(
                        "{}:{n}: `{target}`: {} does not exist",
                        rel(&file),
                        resolved.display()
                    ));
                    continue;
                }
                if let Some(a) = anchor
                    && resolved.extension().is_some_and(|x| x == "md")
                    && !anchors(&resolved).contains(a)
                {
                    broken.push(format!(
                        "{}:{n}: `{target}`: no heading with id `{a}` in {}",
                        rel(&file),
                        rel(&resolved)
                    ));
                }
            }
        }
    }
    assert!(checked > 0, "no links found: is the repository root right?");
    assert!(
        broken.is_empty(),
        "broken links in the docs:\n{}",
        broken.join("\n")
    );
}

/// One line of shell, split into words: quotes honoured, `#` outside quotes starts
/// a comment, `$(…)` and `${…}` kept whole, operators (`&&`, `||`, `;`, `|`, `&`)
/// as words of their own, redirections (`> f`, `2>&1`, `<<'EOF'`) dropped.
#[derive(Default)]
struct ShellLine {
    words: Vec<String>,
    /// The delimiter of a here-document the line opens: the lines up to it are
    /// data, not commands.
    heredoc: Option<String>,
}

#[derive(Default)]
struct Lexer {
    line: ShellLine,
    cur: String,
    has: bool,
    /// The next word is a redirection's target: `Some(true)` for a here-document
    /// delimiter (kept), `Some(false)` for a file (dropped).
    target: Option<bool>,
}

impl Lexer {
    fn end_word(&mut self) {
        if !self.has {
            return;
        }
        let w = std::mem::take(&mut self.cur);
        self.has = false;
        match self.target.take() {
            Some(true) => self.line.heredoc = Some(w),
            Some(false) => {}
            None => self.line.words.push(w),
        }
    }
}

fn shell_words(line: &str) -> ShellLine {
    let mut lx = Lexer::default();
    let mut quote: Option<char> = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            } else {
                lx.cur.push(c);
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                lx.has = true;
            }
            '#' if !lx.has => break,
            ' ' | '\t' => lx.end_word(),
            '$' if matches!(chars.peek(), Some('(' | '{')) => {
                let open = chars.next().unwrap_or('(');
                let close = if open == '(' { ')' } else { '}' };
                lx.cur.push('$');
                lx.cur.push(open);
                let mut depth = 1;
                for n in chars.by_ref() {
                    lx.cur.push(n);
                    if n == open {
                        depth += 1;
                    } else if n == close {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                }
                lx.has = true;
            }
            '>' | '<' => {
                // A file descriptor number right before belongs to the operator.
                if lx.has && lx.cur.chars().all(|d| d.is_ascii_digit()) {
                    lx.cur.clear();
                    lx.has = false;
                }
                lx.end_word();
                let mut op = c.to_string();
                while let Some(&n) = chars.peek() {
                    if !matches!(n, '>' | '<' | '-') {
                        break;
                    }
                    op.push(n);
                    chars.next();
                }
                if chars.peek() == Some(&'&') {
                    // `2>&1`: the target is a descriptor, written in place.
                    chars.next();
                    while chars
                        .peek()
                        .is_some_and(|d| d.is_ascii_digit() || *d == '-')
                    {
                        chars.next();
                    }
                } else {
                    lx.target = Some(op.starts_with("<<"));
                }
            }
            '&' if chars.peek() == Some(&'>') => {
                // `&> file`: both streams to a file.
                chars.next();
                lx.end_word();
                lx.target = Some(false);
            }
            ';' | '|' | '&' => {
                lx.end_word();
                let mut op = c.to_string();
                if chars.peek() == Some(&c) {
                    op.push(c);
                    chars.next();
                }
                lx.line.words.push(op);
            }
            '\\' => {
                if let Some(n) = chars.next() {
                    lx.cur.push(n);
                    lx.has = true;
                }
            }
            _ => {
                lx.cur.push(c);
                lx.has = true;
            }
        }
    }
    lx.end_word();
    lx.line
}

fn is_operator(w: &str) -> bool {
    matches!(w, "&&" | "||" | ";" | "|" | "&" | ";;")
}

/// The arguments of a `cellplane` invocation in `words` (one simple command), if
/// it is one.
fn cellplane_args(words: &[String]) -> Option<Vec<String>> {
    // Leading variable assignments (RUST_LOG=debug cellplane …), keywords and
    // wrappers.
    let mut i = 0;
    while i < words.len()
        && (words[i].contains('=') && !words[i].starts_with('-')
            || matches!(
                words[i].as_str(),
                "exec"
                    | "sudo"
                    | "nohup"
                    | "time"
                    | "do"
                    | "then"
                    | "else"
                    | "{"
                    | "!"
                    | "if"
                    | "while"
                    | "until"
            ))
    {
        i += 1;
    }
    let w = &words[i..];
    let program = w.first()?;
    if program == "cellplane" || program.ends_with("/release/cellplane") {
        return Some(w[1..].to_vec());
    }
    if program == "cargo" && w.get(1).map(String::as_str) == Some("run") {
        let sep = w.iter().position(|x| x == "--")?;
        let opts = &w[2..sep];
        // `-p <pkg>` / `--bin <bin>` must name cellplane (the default binary).
        for pair in opts.windows(2) {
            if matches!(pair[0].as_str(), "-p" | "--package" | "--bin") && pair[1] != "cellplane" {
                return None;
            }
        }
        return Some(w[sep + 1..].to_vec());
    }
    None
}

/// The `$(…)` command substitutions inside a word.
fn substitutions(word: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = word;
    while let Some(at) = rest.find("$(") {
        let body = &rest[at + 2..];
        if body.starts_with('(') {
            // `$((…))` is arithmetic, not a command.
            rest = body;
            continue;
        }
        let mut depth = 1;
        let mut end = body.len();
        for (i, c) in body.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push(body[..end].to_string());
        rest = &body[end..];
    }
    out
}

/// A word with every expansion (`$x`, `${x}`, `$(…)`, `$((…))`) replaced by `1`:
/// the checker cannot know the value, and `1` is a valid number, path, name and
/// port.
fn placeholder(word: &str) -> String {
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('(' | '{') => {
                let open = chars.next().unwrap_or('(');
                let close = if open == '(' { ')' } else { '}' };
                let mut depth = 1;
                for n in chars.by_ref() {
                    if n == open {
                        depth += 1;
                    } else if n == close {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                }
                out.push('1');
            }
            Some(n) if n.is_ascii_alphanumeric() || *n == '_' => {
                while chars
                    .peek()
                    .is_some_and(|n| n.is_ascii_alphanumeric() || *n == '_')
                {
                    chars.next();
                }
                out.push('1');
            }
            _ => out.push('$'),
        }
    }
    out
}

/// Collects the `cellplane` invocations of one (joined) line of shell, those in
/// command substitutions included; returns the here-document it opens, if any.
fn line_commands(line: &str, out: &mut Vec<Vec<String>>) -> Option<String> {
    let parsed = shell_words(line);
    for simple in parsed.words.split(|w| is_operator(w)) {
        for w in simple {
            for inner in substitutions(w) {
                line_commands(&inner, out);
            }
        }
        let simple: Vec<String> = simple
            .iter()
            .map(|w| placeholder(w.trim_start_matches('(').trim_end_matches(')')))
            .filter(|w| !w.is_empty())
            .collect();
        if let Some(args) = cellplane_args(&simple) {
            out.push(args);
        }
    }
    parsed.heredoc
}

/// Every `cellplane` invocation of a runnable block, with its line number.
fn commands(block: &Block) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    let mut first = 0;
    let mut heredoc: Option<String> = None;
    for (n, line) in &block.lines {
        if let Some(end) = &heredoc {
            if line.trim() == end {
                heredoc = None;
            }
            continue;
        }
        if pending.is_empty() {
            first = *n;
        }
        let l = line.trim_end();
        if let Some(cont) = l.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        pending.push_str(l);
        let mut found = Vec::new();
        heredoc = line_commands(&pending, &mut found);
        pending.clear();
        out.extend(found.into_iter().map(|args| (first, args)));
    }
    out
}

fn runnable(info: &str) -> bool {
    matches!(info, "sh" | "bash" | "shell")
}

/// Why the real CLI refuses `cellplane <args>`, if it does: the command is run
/// with `--help` appended, which clap answers (exit 0, a usage line) only when
/// every subcommand, flag and value before it is valid. A usage line still asking
/// for `<COMMAND>` means the docs stopped short of a subcommand.
fn cli_refuses(args: &[String]) -> Option<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_cellplane"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let usage = stdout.lines().find(|l| l.starts_with("Usage:"));
    match usage {
        Some(u) if out.status.success() && !u.trim_end().ends_with("<COMMAND>") => None,
        Some(u) if out.status.success() => Some(format!("names no subcommand ({u})")),
        _ => Some(format!(
            "does not parse:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

#[test]
fn every_documented_command_parses_against_the_cli() {
    let mut failures = Vec::new();
    let mut checked = BTreeSet::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let (_, blocks) = parse(&text);
        for block in blocks.iter().filter(|b| runnable(&b.info)) {
            for (n, args) in commands(block) {
                if !checked.insert(args.clone()) {
                    continue;
                }
                if args.is_empty() {
                    failures.push(format!(
                        "{}:{n}: `cellplane` with no subcommand",
                        rel(&file)
                    ));
                    continue;
                }
                if let Some(why) = cli_refuses(&args) {
                    failures.push(format!(
                        "{}:{n}: `cellplane {}` {why}",
                        rel(&file),
                        args.join(" ")
                    ));
                }
            }
        }
    }
    eprintln!(
        "{} distinct cellplane commands checked against the CLI",
        checked.len()
    );
    assert!(
        !checked.is_empty(),
        "no cellplane command in any runnable block: has the fence convention changed?"
    );
    assert!(
        failures.is_empty(),
        "documented commands the CLI refuses:\n{}",
        failures.join("\n\n")
    );
}

/// The checker itself: what it counts as a command and as a link.
#[test]
fn the_checker_reads_shell_and_markdown_as_intended() {
    let block = Block {
        info: "sh".into(),
        lines: vec![
            (
                1,
                "scripts/setup.sh && cargo run --release -- up   # start".into(),
            ),
            (
                2,
                "RUST_LOG=debug cellplane status --admin 127.0.0.1:2378".into(),
            ),
            (3, "$CARGO_TARGET_DIR/release/cellplane map \\".into()),
            (4, "  --directory 127.0.0.1:2479 show".into()),
            (
                5,
                "cargo run --release -p loadgen -- closed --op put".into(),
            ),
            (6, "echo 'cellplane up' # not a command".into()),
            (7, "cellplane up --data-dir /tmp/x > up.log 2>&1 &".into()),
            (
                8,
                "for id in 1 2 3; do cellplane node --id $id --data-dir d/$id & done".into(),
            ),
            (
                9,
                "v=$(cellplane map show | awk '/^version/ {print $3}')".into(),
            ),
            (10, "cat > map.toml <<'EOF'".into()),
            (11, "cellplane inside a here-document".into()),
            (12, "EOF".into()),
            (13, "cellplane status 2> err.txt".into()),
        ],
    };
    let got: Vec<(usize, String)> = commands(&block)
        .into_iter()
        .map(|(n, a)| (n, a.join(" ")))
        .collect();
    let want = [
        (1, "up"),
        (2, "status --admin 127.0.0.1:2378"),
        (3, "map --directory 127.0.0.1:2479 show"),
        (7, "up --data-dir /tmp/x"),
        (8, "node --id 1 --data-dir d/1"),
        (9, "map show"),
        (13, "status"),
    ];
    let want: Vec<(usize, String)> = want.iter().map(|(n, a)| (*n, a.to_string())).collect();
    assert_eq!(got, want);
    let args = |a: &str| -> Vec<String> { a.split_whitespace().map(String::from).collect() };
    assert_eq!(
        cli_refuses(&args("map --directory 127.0.0.1:2479 show")),
        None
    );
    assert_eq!(
        cli_refuses(&args("node --cell c.toml --id 1 --data-dir d")),
        None
    );
    for bad in [
        "map frobnicate",
        "status --no-such-flag",
        "node --cell c.toml --id one --data-dir d",
        "map",
        "nosuchcommand",
    ] {
        assert!(
            cli_refuses(&args(bad)).is_some(),
            "accepted `cellplane {bad}`"
        );
    }
    assert_eq!(
        link_targets("see [a](../x.md#y), ![b](img.svg) and `[c](not-a-link)`"),
        ["../x.md#y", "img.svg"]
    );
    assert_eq!(
        link_targets("[`CellPool`]: ../crates/x.rs"),
        ["../crates/x.rs"]
    );
    assert_eq!(
        slug("The router's request path"),
        "the-routers-request-path"
    );
    assert_eq!(
        slug("`cellplane up`: a cell (3 members)"),
        "cellplane-up-a-cell-3-members"
    );
}

/// Every family of an exposition as the name a query uses (a counter's with
/// `_total`) and its type.
fn exposed_families(text: &str) -> BTreeSet<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            Some((name, kind.to_string()))
        })
        .collect()
}

/// The rows of docs/metrics.md's tables: (metric, type).
fn documented_families() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("| `cellplane_"))
        .map(|rest| {
            let cols: Vec<&str> = rest.split('|').map(str::trim).collect();
            let name = format!("cellplane_{}", cols[0].trim_end_matches('`'));
            (name, cols[1].to_string())
        })
        .collect()
}

#[test]
fn metrics_reference_lists_every_metric_and_no_other() {
    let mut exposed = exposed_families(&cellplane_cell::metrics::describe());
    let router = exposed_families(&cellplane_router::describe_metrics());
    assert!(
        router
            .iter()
            .all(|(n, _)| n.starts_with("cellplane_router_")),
        "router families share the cellplane_router_ prefix: {router:?}"
    );
    assert!(
        exposed.len() > 20 && router.len() > 15,
        "{exposed:?} {router:?}"
    );
    exposed.extend(router);
    let documented = documented_families();
    let missing: Vec<_> = exposed.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&exposed).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/metrics.md is out of date:\n  exported but not documented (or with another type): \
         {missing:?}\n  documented but not exported: {stale:?}"
    );
}
