//! Splits a byte stream into JSON values.
//!
//! Input objects may span lines or share a line. After a JSON syntax error the
//! input up to the next newline is discarded and parsing resumes after it, so a
//! client that sends garbage gets an error and can carry on with its next line.
//!
//! Framing is linear in the input: a small scanner follows strings and
//! bracket depth byte by byte, remembering where it stopped, and the JSON
//! parser only runs once the scanner sees a value end (or a byte no value can
//! contain). Each byte is therefore scanned once and parsed about once, however
//! the input is split into reads.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Nesting beyond serde_json's recursion limit (128) fails to parse anyway.
const MAX_DEPTH: usize = 128;

/// One unit of input produced by [`JsonFramer::next_frame`].
#[derive(Debug)]
pub(crate) enum Frame<'a> {
    /// The text of a complete, syntactically valid JSON value.
    Value(&'a [u8]),
    /// The input is not valid JSON; the message describes the problem. The
    /// offending input up to the next newline has been discarded.
    Syntax(String),
    /// A value grew beyond the size limit without completing; it has been
    /// discarded up to the next newline.
    TooLarge(usize),
}

/// A JSON value parsed for its syntax only. Unlike `IgnoredAny`, strings
/// are read as a `Value` would read them (so errors carry the same
/// positions), but nothing is kept.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_key::<Checked>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

/// Where the scanner is inside the pending value.
#[derive(Debug, Default)]
struct Scan {
    /// Bytes of the pending input already scanned.
    pos: usize,
    /// The closers expected for the open `{`/`[`, innermost last.
    open: Vec<u8>,
    in_string: bool,
    escaped: bool,
    /// Inside a top-level number or literal, which ends at a delimiter.
    in_scalar: bool,
}

impl Scan {
    /// Advances over `input[self.pos..]`. Returns the length of the prefix
    /// the parser should look at: it holds a complete value or an error.
    fn advance(&mut self, input: &[u8]) -> Option<usize> {
        while let Some(&b) = input.get(self.pos) {
            self.pos += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.open.is_empty() {
                        return Some(self.pos);
                    }
                } else if b < 0x20 {
                    // A raw control character: no string may contain it.
                    return Some(self.pos);
                }
                continue;
            }
            if self.in_scalar {
                if b.is_ascii_whitespace() || b"{}[],:\"".contains(&b) {
                    return Some(self.pos);
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.open.push(if b == b'{' { b'}' } else { b']' });
                    // Deeper than the parser accepts: let it say so now.
                    if self.open.len() == MAX_DEPTH + 1 {
                        return Some(self.pos);
                    }
                }
                b'}' | b']' => match self.open.pop() {
                    Some(closer) if closer == b && !self.open.is_empty() => {}
                    // The value is complete, or a bracket does not match
                    // (or closes nothing): the parser judges which.
                    _ => return Some(self.pos),
                },
                // Between values: a separator is an error the parser will
                // describe.
                b',' | b':' if self.open.is_empty() => return Some(self.pos),
                _ if b.is_ascii_whitespace() => {}
                _ if self.open.is_empty() => self.in_scalar = true,
                _ => {}
            }
        }
        None
    }
}

/// Incremental JSON stream splitter.
#[derive(Debug)]
pub(crate) struct JsonFramer {
    buf: Vec<u8>,
    /// Offset of the first byte in `buf` that has not been consumed.
    start: usize,
    /// Progress of the scanner over `buf[start..]`.
    scan: Scan,
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
            scan: Scan::default(),
            discarding: false,
            max_pending,
        }
    }

    /// Appends received bytes.
    pub(crate) fn push(&mut self, mut data: &[u8]) {
        self.compact();
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
    pub(crate) fn next_frame(&mut self) -> Option<Frame<'_>> {
        self.compact();
        let pending = self.buf.get(self.start..).unwrap_or_default();
        if self.scan.advance(pending).is_none() {
            if self.scan.open.is_empty() && !self.scan.in_string && !self.scan.in_scalar {
                // Only whitespace is pending.
                self.consume(pending.len());
                self.compact();
            } else if pending.len() > self.max_pending {
                let len = pending.len();
                self.consume(len);
                self.compact();
                self.discarding = true;
                return Some(Frame::TooLarge(len));
            }
            return None;
        }
        // The parser reads one value and stops, so handing it all of the
        // pending input costs the length of that value; what follows the
        // value lets it judge a value cut short exactly as it would in a
        // stream.
        let mut stream = serde_json::Deserializer::from_slice(pending).into_iter::<Checked>();
        match stream.next() {
            None => {
                self.consume(pending.len());
                self.compact();
                None
            }
            Some(Ok(Checked)) => {
                let value_end = stream.byte_offset();
                let value_start = pending
                    .iter()
                    .position(|b| !b.is_ascii_whitespace())
                    .unwrap_or(value_end);
                let (from, to) = (self.start + value_start, self.start + value_end);
                self.consume(value_end);
                self.buf.get(from..to).map(Frame::Value)
            }
            Some(Err(err)) if err.is_eof() => {
                // The scanner stopped early (it does not check every
                // token): keep scanning from where it is.
                None
            }
            Some(Err(err)) => {
                let message = message_without_position(&err);
                let err_idx = error_index(pending, err.line(), err.column());
                match pending
                    .get(err_idx..)
                    .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
                {
                    Some(nl) => self.consume(err_idx + nl + 1),
                    None => {
                        self.consume(pending.len());
                        self.discarding = true;
                    }
                }
                self.compact();
                Some(Frame::Syntax(message))
            }
        }
    }

    /// Drops `len` bytes of pending input and restarts the scanner after them.
    fn consume(&mut self, len: usize) {
        self.start = (self.start + len).min(self.buf.len());
        self.scan = Scan::default();
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
                Frame::Value(v) => serde_json::from_slice::<serde_json::Value>(v)
                    .expect("frames are valid JSON")
                    .to_string(),
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

    #[test]
    fn mismatched_brackets_are_reported_at_once() {
        let mut f = JsonFramer::new(1024);
        f.push(b"{\"a\": [1}\n{\"b\":2}\n");
        let got = frames(&mut f);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("ERR expected `,` or `]`"), "{got:?}");
        assert_eq!(got[1], "{\"b\":2}");
    }

    #[test]
    fn scalars_and_strings_at_top_level() {
        let mut f = JsonFramer::new(1024);
        f.push(b"12 \"x{\" true[1]");
        assert_eq!(frames(&mut f), ["12", "\"x{\"", "true", "[1]"]);
    }

    #[test]
    fn nesting_beyond_the_parser_limit_is_an_error() {
        let mut f = JsonFramer::new(1 << 20);
        f.push(&[b'['; 200]);
        let got = frames(&mut f);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("ERR recursion limit exceeded"),
            "{got:?}"
        );
    }

    /// Each byte is scanned once: 200 KB arriving a byte at a time takes
    /// about as long as arriving at once (it used to re-parse the whole
    /// pending buffer per byte, quadratic in the size).
    #[test]
    fn byte_at_a_time_is_linear() {
        let mut text = b"{\"execute\": \"x\", \"arguments\": {\"a\": [".to_vec();
        for i in 0..40_000 {
            text.extend_from_slice(if i == 0 { b"[1]" } else { b",[1]" });
        }
        text.extend_from_slice(b"]}}\n");
        let started = std::time::Instant::now();
        let mut f = JsonFramer::new(1 << 20);
        let mut got = 0;
        for b in &text {
            f.push(std::slice::from_ref(b));
            while let Some(frame) = f.next_frame() {
                assert!(matches!(frame, Frame::Value(v) if v.len() + 1 == text.len()));
                got += 1;
            }
        }
        assert_eq!(got, 1);
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(2),
            "framing {} bytes one at a time took {took:?}",
            text.len()
        );
    }
}
