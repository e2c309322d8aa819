//! Splits a byte stream into JSON values.
//!
//! Input objects may span lines or share a line. After a JSON syntax error the
//! input up to the next newline is discarded and parsing resumes after it, so a
//! client that sends garbage gets an error and can carry on with its next line.

use serde_json::Value;

/// One unit of input produced by [`JsonFramer::next_frame`].
#[derive(Debug)]
pub(crate) enum Frame {
    /// A complete JSON value.
    Value(Value),
    /// The input is not valid JSON; the message describes the problem. The
    /// offending input up to the next newline has been discarded.
    Syntax(String),
    /// A value grew beyond the size limit without completing; it has been
    /// discarded up to the next newline.
    TooLarge(usize),
}

/// Incremental JSON stream splitter.
#[derive(Debug)]
pub(crate) struct JsonFramer {
    buf: Vec<u8>,
    /// Offset of the first byte in `buf` that has not been consumed.
    start: usize,
    /// Drop input until (and including) the next newline.
    discarding: bool,
    /// Largest incomplete value kept in memory.
    max_pending: usize,
}

impl JsonFramer {
    pub(crate) fn new(max_pending: usize) -> Self {
        JsonFramer {
            buf: Vec::new(),
            start: 0,
            discarding: false,
            max_pending,
        }
    }

    /// Appends received bytes.
    pub(crate) fn push(&mut self, mut data: &[u8]) {
        if self.discarding {
            match data.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.discarding = false;
                    data = &data[nl + 1..];
                }
                None => return,
            }
        }
        self.buf.extend_from_slice(data);
    }

    /// Returns the next complete frame, or `None` when more input is needed.
    pub(crate) fn next_frame(&mut self) -> Option<Frame> {
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let mut stream = serde_json::Deserializer::from_slice(pending).into_iter::<Value>();
        let frame = match stream.next() {
            None => {
                // Only whitespace is left.
                self.start = self.buf.len();
                None
            }
            Some(Ok(value)) => {
                self.start += stream.byte_offset();
                Some(Frame::Value(value))
            }
            Some(Err(err)) if err.is_eof() => {
                if pending.len() > self.max_pending {
                    let len = pending.len();
                    self.start = self.buf.len();
                    self.discarding = true;
                    Some(Frame::TooLarge(len))
                } else {
                    None
                }
            }
            Some(Err(err)) => {
                let err_idx = error_index(pending, err.line(), err.column());
                match pending
                    .get(err_idx..)
                    .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
                {
                    Some(nl) => self.start += err_idx + nl + 1,
                    None => {
                        self.start = self.buf.len();
                        self.discarding = true;
                    }
                }
                Some(Frame::Syntax(message_without_position(&err)))
            }
        };
        self.compact();
        frame
    }

    fn compact(&mut self) {
        if self.start >= self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

/// Byte index in `input` of the byte at which serde_json reported an error
/// (`line` is 1-based, `column` counts the bytes of that line consumed so far).
fn error_index(input: &[u8], line: usize, column: usize) -> usize {
    let mut line_start = 0;
    if line > 1 {
        let mut seen = 0;
        for (i, &b) in input.iter().enumerate() {
            if b == b'\n' {
                seen += 1;
                if seen == line - 1 {
                    line_start = i + 1;
                    break;
                }
            }
        }
    }
    (line_start + column.saturating_sub(1)).min(input.len())
}

/// serde_json's message without the " at line L column C" suffix.
pub(crate) fn message_without_position(err: &serde_json::Error) -> String {
    let full = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    match full.strip_suffix(&suffix) {
        Some(msg) => msg.to_string(),
        None => full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framer: &mut JsonFramer) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(f) = framer.next_frame() {
            out.push(match f {
                Frame::Value(v) => v.to_string(),
                Frame::Syntax(m) => format!("ERR {m}"),
                Frame::TooLarge(n) => format!("LARGE {n}"),
            });
        }
        out
    }

    #[test]
    fn splits_objects_on_one_line_and_across_lines() {
        let mut f = JsonFramer::new(1024);
        f.push(b"{\"a\":1}{\"b\":2} {\"c\":\n3}\n{\"d\"");
        assert_eq!(frames(&mut f), ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]);
        f.push(b": 4}\n");
        assert_eq!(frames(&mut f), ["{\"d\":4}"]);
        assert!(f.buf.is_empty());
    }

    #[test]
    fn byte_by_byte() {
        let mut f = JsonFramer::new(1024);
        let mut got = Vec::new();
        for b in "{\"x\": \"h\u{e9}llo\"}\n[1, 2]".bytes() {
            f.push(&[b]);
            got.extend(frames(&mut f));
        }
        assert_eq!(got, ["{\"x\":\"h\u{e9}llo\"}", "[1,2]"]);
    }

    #[test]
    fn syntax_error_discards_to_newline() {
        let mut f = JsonFramer::new(1024);
        f.push(b"{\"a\" 1} {\"lost\":1}\n{\"b\":2}\n");
        let got = frames(&mut f);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("ERR expected `:`"), "{got:?}");
        assert_eq!(got[1], "{\"b\":2}");
    }

    #[test]
    fn syntax_error_without_newline_discards_following_chunks() {
        let mut f = JsonFramer::new(1024);
        f.push(b"}}} garbage");
        assert_eq!(frames(&mut f).len(), 1);
        f.push(b"more garbage {\"x\":1}");
        assert!(frames(&mut f).is_empty());
        f.push(b" still\n{\"ok\":true}\n");
        assert_eq!(frames(&mut f), ["{\"ok\":true}"]);
    }

    #[test]
    fn newline_inside_string_discards_rest_of_next_line() {
        let mut f = JsonFramer::new(1024);
        f.push(b"{\"a\":\"x\ny\"}\n{\"b\":2}\n");
        let got = frames(&mut f);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("ERR control character"), "{got:?}");
        assert_eq!(got[1], "{\"b\":2}");
    }

    #[test]
    fn oversized_value_is_dropped() {
        let mut f = JsonFramer::new(16);
        f.push(b"{\"a\": \"0123456789012345678901234567890");
        assert_eq!(frames(&mut f), ["LARGE 38"]);
        f.push(b"789\"}\n{\"b\":1}\n");
        assert_eq!(frames(&mut f), ["{\"b\":1}"]);
    }
}
