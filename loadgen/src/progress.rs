//! The terminal progress bar (indicatif): measured seconds, the last second's
//! rate, errors so far and the last second's p99, and a line per fault as it
//! happens. Hidden when stderr is not a terminal (fault lines then go to stderr
//! as plain lines).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
    /// Lines are printed even when the bar is hidden.
    lines: bool,
}

impl Progress {
    /// A bar over `total_s` measured seconds (a spinner when the run is bounded by
    /// a request count); hidden unless `enabled`.
    pub fn new(enabled: bool, total_s: Option<f64>, lines: bool) -> Progress {
        let bar = match total_s {
            Some(t) => ProgressBar::with_draw_target(
                Some(t.ceil().max(1.0) as u64),
                ProgressDrawTarget::stderr(),
            ),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
        };
        if !enabled {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        let template = if total_s.is_some() {
            "{prefix:>8} [{bar:30.cyan/blue}] {pos:>3}/{len}s {msg}"
        } else {
            "{prefix:>8} {spinner} {pos:>3}s {msg}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix("warm-up");
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar, lines }
    }

    pub fn hidden() -> Progress {
        Progress::new(false, None, false)
    }

    /// Measured seconds so far, and the last complete second's figures.
    pub fn update(&self, measured_s: f64, ok_per_s: u64, errors: u64, p99_us: u64, note: &str) {
        if measured_s < 0.0 {
            self.bar.set_prefix("warm-up");
            self.bar.set_position(0);
        } else {
            self.bar.set_prefix("measured");
            self.bar.set_position(measured_s as u64);
        }
        self.bar.set_message(format!(
            "{ok_per_s:>7} ok/s  errors {errors:<6} p99 {:>8.2} ms  {note}",
            p99_us as f64 / 1000.0
        ));
    }

    /// A line above the bar (or on stderr when the bar is hidden).
    pub fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            if self.lines {
                eprintln!("{line}");
            }
        } else {
            self.bar.println(line);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
