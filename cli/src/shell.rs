//! Terminal output in cargo's style: right-aligned green status verbs on stderr, colour only
//! on a terminal (or when asked), `--quiet` and `--verbose`.

use std::io::{IsTerminal, Write};

use anstream::{ColorChoice, eprintln};
use anstyle::{AnsiColor, Style};

const GREEN: Style = AnsiColor::Green.on_default().bold();
const RED: Style = AnsiColor::Red.on_default().bold();
const YELLOW: Style = AnsiColor::Yellow.on_default().bold();
const CYAN: Style = AnsiColor::Cyan.on_default().bold();
const DIM: Style = Style::new().dimmed();
const BOLD: Style = Style::new().bold();

/// How much to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// Where status and data go.
#[derive(Debug, Clone, Copy)]
pub struct Shell {
    pub verbosity: Verbosity,
}

impl Shell {
    /// A shell honouring `--color` (`auto` follows the terminal and `NO_COLOR`).
    pub fn new(verbosity: Verbosity, color: &str) -> Self {
        let choice = match color {
            "always" => ColorChoice::Always,
            "never" => ColorChoice::Never,
            _ => ColorChoice::Auto,
        };
        choice.write_global();
        Self { verbosity }
    }

    /// `   Compiling demo v0.1.0`: a green verb and a message, unless quiet.
    pub fn status(&self, verb: &str, message: impl std::fmt::Display) {
        if self.verbosity > Verbosity::Quiet {
            eprintln!("{GREEN}{verb:>12}{GREEN:#} {message}");
        }
    }

    /// A cyan note for things that happen once (a key created, a target installed).
    pub fn note(&self, message: impl std::fmt::Display) {
        if self.verbosity > Verbosity::Quiet {
            eprintln!("{CYAN}note{CYAN:#}: {message}");
        }
    }

    /// A warning, shown even when quiet.
    pub fn warn(&self, message: impl std::fmt::Display) {
        eprintln!("{YELLOW}warning{YELLOW:#}: {message}");
    }

    /// An error with optional detail lines, shown even when quiet.
    pub fn error(&self, message: impl std::fmt::Display, details: &[String]) {
        eprintln!("{RED}error{RED:#}: {message}");
        for d in details {
            eprintln!("  {DIM}-{DIM:#} {d}");
        }
    }

    /// Whether stderr is a terminal (for progress bars).
    pub fn interactive(&self) -> bool {
        self.verbosity > Verbosity::Quiet && std::io::stderr().is_terminal()
    }
}

/// Bold text for table headers.
pub fn bold(text: &str) -> String {
    format!("{BOLD}{text}{BOLD:#}")
}

/// Colours a component state the way a reader scans it: green running, red failed.
pub fn state(text: &str) -> String {
    let style = match text {
        "running" => GREEN,
        "failed" | "crash-looping" => RED,
        _ => YELLOW,
    };
    format!("{style}{text}{style:#}")
}

/// Prints rows as an aligned table on stdout (ANSI codes do not count towards widths).
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let visible = |s: &str| strip_ansi(s).chars().count();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(visible(cell));
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(visible(cell));
            out.push_str(cell);
            if i + 1 < cells.len() {
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out
    };
    anstream::println!(
        "{}",
        line(header.iter().map(|h| bold(h)).collect::<Vec<_>>())
    );
    for row in rows {
        anstream::println!("{}", line(row.clone()));
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A one-line progress bar on stderr, redrawn in place.
#[derive(Debug)]
pub struct Progress {
    verb: &'static str,
    total: u64,
    done: u64,
    shown_percent: u64,
    enabled: bool,
}

impl Progress {
    /// A bar for `total` bytes; drawn only on a terminal.
    pub fn new(shell: &Shell, verb: &'static str, total: u64) -> Self {
        Self {
            verb,
            total: total.max(1),
            done: 0,
            shown_percent: u64::MAX,
            enabled: shell.interactive(),
        }
    }

    /// Adds `n` bytes and redraws when the percentage changed.
    pub fn advance(&mut self, n: u64) {
        self.done += n;
        let percent = self.done * 100 / self.total;
        if self.enabled && percent != self.shown_percent {
            self.shown_percent = percent;
            let width = 30;
            let filled = (percent as usize * width / 100).min(width);
            let mut err = anstream::stderr();
            let _ = write!(
                err,
                "\r{GREEN}{:>12}{GREEN:#} [{}{}] {percent:>3}% {}/{}",
                self.verb,
                "=".repeat(filled),
                " ".repeat(width - filled),
                human_bytes(self.done),
                human_bytes(self.total)
            );
            let _ = err.flush();
        }
    }

    /// Clears the bar.
    pub fn finish(&mut self) {
        if self.enabled && self.shown_percent != u64::MAX {
            let mut err = anstream::stderr();
            let _ = write!(err, "\r{}\r", " ".repeat(80));
            let _ = err.flush();
        }
    }
}

/// `1.5 MiB`, `12 KiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let f = n as f64;
    if f >= KIB * KIB {
        format!("{:.1} MiB", f / KIB / KIB)
    } else if f >= KIB {
        format!("{:.0} KiB", f / KIB)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_ignore_colour_codes() {
        assert_eq!(strip_ansi(&state("running")), "running");
        assert_eq!(human_bytes(1536), "2 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(10), "10 B");
    }
}
