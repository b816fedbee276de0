//! The HTML report: one self-contained file (inline CSS and SVG, no script, no
//! external resource) that opens offline. Plots are drawn with plotters' SVG
//! backend: throughput, errors and p99 per cell over time, then each cell's
//! throughput and latency percentiles, every plot with the fault windows shaded.

use std::fmt::Write as _;

use plotters::prelude::*;

use crate::faults::FaultWindow;
use crate::report::{Report, Stats, load_label};

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];
const ERROR_RED: RGBColor = RGBColor(214, 39, 40);
const FAULT_FILL: RGBColor = RGBColor(214, 39, 40);

/// One line of a plot; `NaN` values leave a gap (a second without data).
pub struct Line {
    pub name: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG line chart over `0..x_max` seconds with `windows` shaded.
pub fn line_chart(
    title: &str,
    y_desc: &str,
    lines: &[Line],
    windows: &[FaultWindow],
    x_max: f64,
) -> Result<String, String> {
    let y_top = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .fold(0.0f64, f64::max);
    // Head room above the data for the legend and the fault labels.
    let y_max = if y_top > 0.0 { y_top * 1.3 } else { 1.0 };
    let x_max = x_max.max(1.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 300)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("seconds (measured)")
            .y_desc(y_desc)
            .x_labels(12)
            .y_labels(6)
            .light_line_style(RGBColor(240, 240, 240))
            .bold_line_style(RGBColor(220, 220, 220))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(e)?;
        for w in windows {
            let (x0, x1) = (w.start_s.clamp(0.0, x_max), w.end_s.clamp(0.0, x_max));
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.0), (x1.max(x0 + 0.05), y_max)],
                    FAULT_FILL.mix(0.13).filled(),
                )))
                .map_err(e)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    w.label.clone(),
                    (x0 + x_max * 0.004, y_max * 0.97),
                    ("sans-serif", 12).into_font().color(&FAULT_FILL),
                )))
                .map_err(e)?;
        }
        for line in lines {
            let color = line.color;
            let mut first = true;
            for segment in line
                .points
                .split(|p| !p.1.is_finite())
                .filter(|s| !s.is_empty())
            {
                let drawn = chart
                    .draw_series(LineSeries::new(
                        segment.iter().copied(),
                        color.stroke_width(2),
                    ))
                    .map_err(e)?;
                if first {
                    drawn.label(line.name.clone()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                    first = false;
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn stats_row(out: &mut String, a: &str, b: &str, s: &Stats) {
    let codes: Vec<String> = s
        .errors_by_code
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let _ = writeln!(
        out,
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td class={}>{}</td><td>{:.3}%</td>\
         <td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td></tr>",
        esc(a),
        esc(b),
        s.ok,
        s.throughput,
        if s.errors > 0 { "bad" } else { "\"\"" },
        s.errors,
        s.error_rate * 100.0,
        ms(s.latency.p50_us),
        ms(s.latency.p90_us),
        ms(s.latency.p99_us),
        ms(s.latency.p999_us),
        ms(s.latency.max_us),
        esc(&codes.join(", "))
    );
}

/// The whole report as one HTML document.
pub fn render(r: &Report) -> String {
    let mut h = String::new();
    let title = format!("loadgen: {} → {}", r.scenario.name, r.target.kind);
    let _ = write!(
        h,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\n\
         body{{font-family:sans-serif;margin:24px;color:#222;max-width:1000px}}\n\
         table{{border-collapse:collapse;margin:8px 0 16px}}\n\
         td,th{{border:1px solid #ddd;padding:3px 8px;text-align:right;font-size:13px}}\n\
         td:first-child,th:first-child,td:nth-child(2){{text-align:left}}\n\
         th{{background:#f4f4f4}} .bad{{color:#d62728;font-weight:bold}}\n\
         .fault{{background:#fbe3e3}} code{{background:#f4f4f4;padding:1px 4px}}\n\
         h2{{margin-top:28px;border-bottom:1px solid #ddd}} svg{{display:block;margin:6px 0}}\n\
         </style></head><body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    let _ = writeln!(
        h,
        "<p>{}<br>target: <code>{}</code> ({})<br>measured {:.1} s after {} s of warm-up; \
         started at {} ms since the Unix epoch; machine: {} cores, {} {} ({})<br>\
         scenario file: <code>{}</code></p>",
        esc(&r.scenario.description),
        esc(&r.target.endpoints.join(",")),
        esc(&load_label(&r.scenario)),
        r.measured_s,
        r.scenario.load.warmup.0,
        r.started_unix_ms,
        r.machine.cores,
        esc(&r.machine.os),
        esc(&r.machine.kernel),
        esc(&r.machine.hostname),
        esc(r.scenario_file.as_deref().unwrap_or("-"))
    );

    let header = "<tr><th>op</th><th>cell</th><th>ok</th><th>ok/s</th><th>errors</th><th>error rate</th>\
                  <th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th><th>errors by code</th></tr>";
    let _ = writeln!(h, "<h2>Summary</h2>\n<table>{header}");
    for o in &r.ops {
        stats_row(&mut h, &o.op, &o.cell, &o.stats);
    }
    for c in &r.cells {
        stats_row(&mut h, "all requests", &c.cell, &c.stats);
    }
    stats_row(&mut h, "all requests", "all cells", &r.totals);
    let _ = writeln!(h, "</table>");
    let samples: Vec<String> = r
        .ops
        .iter()
        .flat_map(|o| {
            o.stats.error_samples.iter().map(move |(code, msg)| {
                format!(
                    "<li>{} on {}: <b>{}</b>: {}</li>",
                    esc(&o.op),
                    esc(&o.cell),
                    esc(code),
                    esc(msg)
                )
            })
        })
        .collect();
    if !samples.is_empty() {
        let _ = writeln!(
            h,
            "<p>First error of each kind:</p><ul>{}</ul>",
            samples.join("")
        );
    }
    if r.totals.conflicts > 0 {
        let _ = writeln!(
            h,
            "<p>compare-and-swap txns whose compare failed: {}</p>",
            r.totals.conflicts
        );
    }
    if let Some(w) = &r.watch {
        let _ = writeln!(
            h,
            "<p>watch: {} {} watchers; {} events read; delivery latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms</p>",
            w.watchers,
            esc(&w.mode),
            w.events,
            ms(w.delivery.p50_us),
            ms(w.delivery.p99_us),
            ms(w.delivery.p999_us),
            ms(w.delivery.max_us)
        );
    }

    let _ = writeln!(h, "<h2>Faults</h2>");
    if r.faults.is_empty() {
        let _ = writeln!(h, "<p>No fault was injected.</p>");
    } else {
        let _ = writeln!(
            h,
            "<table><tr><th>planned s</th><th>applied s</th><th>done s</th><th>action</th><th>target</th><th>pids</th><th>ok</th><th>what happened</th></tr>"
        );
        for f in &r.faults {
            let _ = writeln!(
                h,
                "<tr class=fault><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>",
                f.planned_s,
                f.at_s,
                f.done_s,
                f.action.name(),
                esc(&f.target),
                f.pids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
                if f.ok { "yes" } else { "no" },
                esc(&f.message)
            );
        }
        let _ = writeln!(h, "</table>");
        let _ = writeln!(
            h,
            "<p>Fault windows (shaded in every plot): {}</p>",
            r.fault_windows
                .iter()
                .map(|w| format!(
                    "{} from {:.1} s to {:.1} s{}",
                    esc(&w.label),
                    w.start_s,
                    w.end_s,
                    if w.healed { "" } else { " (not undone)" }
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    if !r.blast_radius.is_empty() {
        let _ = writeln!(
            h,
            "<h2>Blast radius</h2><p>Each cell during a fault window against the same number of seconds just before it (* the faulty cell).</p>\
             <table><tr><th>fault</th><th>cell</th><th>ok/s before</th><th>ok/s during</th><th>error rate before</th><th>error rate during</th><th>p99 ms before</th><th>p99 ms during</th></tr>"
        );
        for b in &r.blast_radius {
            for c in &b.cells {
                let _ = writeln!(
                    h,
                    "<tr{}><td>{}</td><td>{}{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.3}%</td><td class={}>{:.3}%</td><td>{:.2}</td><td>{:.2}</td></tr>",
                    if c.faulty { " class=fault" } else { "" },
                    esc(&b.fault),
                    esc(&c.cell),
                    if c.faulty { " *" } else { "" },
                    c.before.throughput,
                    c.during.throughput,
                    c.before.error_rate * 100.0,
                    if c.during.error_rate > c.before.error_rate {
                        "bad"
                    } else {
                        "\"\""
                    },
                    c.during.error_rate * 100.0,
                    ms(c.before.p99_us),
                    ms(c.during.p99_us)
                );
            }
        }
        let _ = writeln!(h, "</table>");
    }

    let x_max = r
        .series
        .iter()
        .map(|s| s.points.len())
        .max()
        .unwrap_or(0)
        .max(r.measured_s.ceil() as usize) as f64;
    let mid = |t: u64| t as f64 + 0.5;
    let per_cell = |f: &dyn Fn(&crate::report::Point) -> f64| -> Vec<Line> {
        r.series
            .iter()
            .enumerate()
            .map(|(i, s)| Line {
                name: s.cell.clone(),
                color: PALETTE[i % PALETTE.len()],
                points: s.points.iter().map(|p| (mid(p.t), f(p))).collect(),
            })
            .collect()
    };
    let latency = |us: u64| if us == 0 { f64::NAN } else { ms(us) };
    let mut plots: Vec<(String, Result<String, String>)> = vec![
        (
            "Throughput by cell".into(),
            line_chart(
                "successful requests per second, by cell",
                "ok/s",
                &per_cell(&|p| p.ok as f64),
                &r.fault_windows,
                x_max,
            ),
        ),
        (
            "Errors by cell".into(),
            line_chart(
                "errors per second, by cell",
                "errors/s",
                &per_cell(&|p| p.errors as f64),
                &r.fault_windows,
                x_max,
            ),
        ),
        (
            "p99 latency by cell".into(),
            line_chart(
                "p99 latency of each second, by cell",
                "p99 ms",
                &per_cell(&|p| latency(p.p99_us)),
                &r.fault_windows,
                x_max,
            ),
        ),
    ];
    for s in &r.series {
        let pts = |f: &dyn Fn(&crate::report::Point) -> f64| -> Vec<(f64, f64)> {
            s.points.iter().map(|p| (mid(p.t), f(p))).collect()
        };
        plots.push((
            format!("Cell {}", s.cell),
            line_chart(
                &format!("{}: requests per second", s.cell),
                "per second",
                &[
                    Line {
                        name: "ok/s".into(),
                        color: PALETTE[0],
                        points: pts(&|p| p.ok as f64),
                    },
                    Line {
                        name: "errors/s".into(),
                        color: ERROR_RED,
                        points: pts(&|p| p.errors as f64),
                    },
                ],
                &r.fault_windows,
                x_max,
            ),
        ));
        plots.push((
            String::new(),
            line_chart(
                &format!("{}: latency of each second", s.cell),
                "ms",
                &[
                    Line {
                        name: "p50".into(),
                        color: PALETTE[2],
                        points: pts(&|p| latency(p.p50_us)),
                    },
                    Line {
                        name: "p99".into(),
                        color: PALETTE[1],
                        points: pts(&|p| latency(p.p99_us)),
                    },
                    Line {
                        name: "p99.9".into(),
                        color: PALETTE[3],
                        points: pts(&|p| latency(p.p999_us)),
                    },
                ],
                &r.fault_windows,
                x_max,
            ),
        ));
    }
    for (heading, svg) in plots {
        if !heading.is_empty() {
            let _ = writeln!(h, "<h2>{}</h2>", esc(&heading));
        }
        match svg {
            Ok(svg) => h.push_str(&svg),
            Err(e) => {
                let _ = writeln!(h, "<p class=bad>plot failed: {}</p>", esc(&e));
            }
        }
        h.push('\n');
    }
    let _ = writeln!(
        h,
        "<h2>Report data</h2><p>The JSON report beside this file holds every figure (schema <code>{}</code>, see loadgen/REPORT.md).</p></body></html>",
        esc(&r.schema)
    );
    h
}

/// The SVG of every plot in the report, in order (for checking them apart from
/// the HTML).
pub fn svgs(html: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find("<svg") {
        let Some(len) = rest[start..].find("</svg>") else {
            break;
        };
        out.push(&rest[start..start + len + 6]);
        rest = &rest[start + len + 6..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_is_self_contained_html_with_shaded_plots() {
        let r = crate::report::tests::sample_report();
        let html = render(&r);
        assert!(html.starts_with("<!doctype html>"));
        // Opens offline: no script, nothing loaded from elsewhere.
        for needle in ["<script", "<link", " src=", "url("] {
            assert!(!html.contains(needle), "{needle}");
        }
        let plots = svgs(&html);
        // 3 overview plots + 2 per cell (alpha, beta).
        assert_eq!(plots.len(), 7);
        for p in &plots {
            assert!(
                p.contains("kill cell beta"),
                "every plot marks the fault window"
            );
            assert!(p.contains("<polyline") || p.contains("<path"), "has lines");
        }
        assert!(html.contains("Blast radius"));
    }
}
