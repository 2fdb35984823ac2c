//! The terminal's line editor: rustyline on a thread of its own (it blocks), with
//! completion of commands and known usernames, input history saved in the data directory,
//! and bracketed paste (a pasted line is inserted at once, whatever its length). Lines go to
//! the async side one at a time: the editor waits for the prompt of the next one, so a
//! command's output (and a conversation's prompt) is there before the next prompt.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::FileHistory;
use rustyline::validate::Validator;
use rustyline::{CompletionType, Config, Context, Editor, ExternalPrinter, Helper};
use tokio::sync::mpsc;

use crate::commands::{TAKES_USER, WORDS};

/// Input lines kept in the history file.
const HISTORY_SIZE: usize = 1_000;

/// Longer lines (a paste) are not kept in the input history.
const HISTORY_LINE_MAX: usize = 4_096;

/// What the editor read.
#[derive(Debug)]
pub enum Input {
    /// A line (Enter).
    Line(String),
    /// Ctrl-D on an empty line, or Ctrl-C.
    End,
}

/// Names offered for completion, shared with the async side, which adds every name it
/// meets.
pub type Names = Arc<Mutex<BTreeSet<String>>>;

struct Completion {
    names: Names,
}

impl Completer for Completion {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        // After the last whitespace, whatever its width in bytes (an ideographic space is 3).
        let start = before
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map_or(0, |(at, c)| at + c.len_utf8());
        let word = &before[start..];
        let pair = |s: String| Pair {
            display: s.clone(),
            replacement: format!("{s} "),
        };
        let earlier: Vec<&str> = before[..start].split_whitespace().collect();
        if earlier.is_empty() {
            let (slash, bare) = match word.strip_prefix('/') {
                Some(bare) => ("/", bare),
                None => ("", word),
            };
            let found = WORDS
                .iter()
                .filter(|w| w.starts_with(bare))
                .map(|w| pair(format!("{slash}{w}")))
                .collect();
            return Ok((start, found));
        }
        let command = earlier[0].trim_start_matches('/').to_ascii_lowercase();
        if earlier.len() == 1 && TAKES_USER.contains(&command.as_str()) {
            let names = self.names.lock().map(|n| n.clone()).unwrap_or_default();
            let found = names
                .into_iter()
                .filter(|n| n.starts_with(word))
                .map(pair)
                .collect();
            return Ok((start, found));
        }
        Ok((start, Vec::new()))
    }
}

impl Hinter for Completion {
    type Hint = String;
}
impl Highlighter for Completion {}
impl Validator for Completion {}
impl Helper for Completion {}

/// The editor's side: started by [`start`].
pub struct Terminal {
    /// Lines read, in order.
    pub lines: mpsc::Receiver<Input>,
    /// The prompt for the next line: send one after handling each line.
    pub prompts: std::sync::mpsc::Sender<String>,
    /// Prints above the prompt, keeping what is being typed.
    pub printer: Box<dyn ExternalPrinter + Send>,
}

/// Starts the editor thread, showing `prompt` first.
pub fn start(names: Names, history: PathBuf, prompt: String) -> anyhow::Result<Terminal> {
    let config = Config::builder()
        .max_history_size(HISTORY_SIZE)?
        .auto_add_history(false)
        .completion_type(CompletionType::List)
        .bracketed_paste(true)
        .build();
    let mut editor: Editor<Completion, FileHistory> = Editor::with_config(config)?;
    editor.set_helper(Some(Completion { names }));
    // A missing file is the first run.
    let _ = editor.load_history(&history);
    let printer = Box::new(editor.create_external_printer()?);
    let (line_tx, lines) = mpsc::channel(1);
    let (prompts, prompt_rx) = std::sync::mpsc::channel::<String>();
    std::thread::Builder::new()
        .name("p2pchat-editor".into())
        .spawn(move || {
            let mut prompt = prompt;
            loop {
                let input = match editor.readline(&prompt) {
                    Ok(line) => {
                        if !line.trim().is_empty() && line.len() <= HISTORY_LINE_MAX {
                            let _ = editor.add_history_entry(line.trim());
                            if let Err(e) = editor.save_history(&history) {
                                tracing::debug!("cannot save the input history: {e}");
                            }
                        }
                        Input::Line(line)
                    }
                    Err(ReadlineError::Eof | ReadlineError::Interrupted) => Input::End,
                    Err(e) => {
                        tracing::warn!("the terminal failed: {e}");
                        Input::End
                    }
                };
                let end = matches!(input, Input::End);
                if line_tx.blocking_send(input).is_err() || end {
                    return;
                }
                match prompt_rx.recv() {
                    Ok(next) => prompt = next,
                    Err(_) => return,
                }
            }
        })?;
    Ok(Terminal {
        lines,
        prompts,
        printer,
    })
}

/// The terminal's settings when the client started, put back when it ends (the editor
/// thread may be in the middle of a line, in raw mode, when the client stops).
pub struct SavedTerminal(Option<nix::sys::termios::Termios>);

impl SavedTerminal {
    /// Saves the settings of standard input, if it is a terminal.
    pub fn save() -> Self {
        Self(nix::sys::termios::tcgetattr(std::io::stdin()).ok())
    }
}

impl Drop for SavedTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // The editor may have stopped mid-line: bracketed paste off (the editor turns it
            // on while reading), and the line it left cleared, so that what is printed next
            // starts a line of its own.
            let mut stdout = std::io::stdout();
            let _ = std::io::Write::write_all(&mut stdout, b"\x1b[?2004l\r\x1b[K");
            let _ = std::io::Write::flush(&mut stdout);
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustyline::history::DefaultHistory;

    fn complete(line: &str) -> Vec<String> {
        let names: Names = Arc::new(Mutex::new(
            ["bob", "bella", "carol"].map(String::from).into(),
        ));
        let history = DefaultHistory::new();
        let ctx = Context::new(&history);
        Completion { names }
            .complete(line, line.len(), &ctx)
            .unwrap()
            .1
            .into_iter()
            .map(|p| p.replacement)
            .collect()
    }

    #[test]
    fn completes_commands_then_names() {
        assert_eq!(complete("h"), ["help ", "history "]);
        assert_eq!(complete("/mu"), ["/mute ", "/muted "]);
        assert_eq!(complete("send b"), ["bella ", "bob "]);
        assert_eq!(complete("/msg c"), ["carol "]);
        assert!(
            complete("send bob b").is_empty(),
            "the message is not completed"
        );
        assert!(complete("list b").is_empty());
        // Whitespace wider than a byte (an input method's ideographic space, a no-break
        // space) is a separator like any other, not a panic.
        assert_eq!(complete("send\u{3000}b"), ["bella ", "bob "]);
        assert_eq!(complete("send\u{a0}c"), ["carol "]);
    }
}
