//! The token figure an OpenAI-compatible response reports in its body (`cost_from =
//! "openai:…"`): the top-level `usage` object of an `application/json` completion, or of the
//! last event of a `text/event-stream` that carries a non-null one (what
//! `stream_options.include_usage` produces). A [`Scanner`] is fed the body as it streams to
//! the client, in whatever pieces it arrives, and keeps a fixed amount of state: it collects
//! nothing, so a 1 GiB body costs what a 1 KiB one does.
//!
//! Choices where JSON leaves room: the figure must be a whole number of at most 2^52 − 1 (what
//! the store's arithmetic takes); `12.5`, `1e3`, `-1`, a string or `null` is no figure. A key
//! written with escapes (`"\u0075sage"`) does not match. Malformed JSON gives no figure
//! unless a whole `usage` object was read before the damage. Of a stream, the last event
//! whose `usage` object carries the field wins; a later `"usage": null` does not clear it.

use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};

/// Which figure of `usage` a limit reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Total,
    Prompt,
    Completion,
}

impl Field {
    pub fn key(self) -> &'static str {
        match self {
            Field::Total => "total_tokens",
            Field::Prompt => "prompt_tokens",
            Field::Completion => "completion_tokens",
        }
    }
}

/// How the body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    EventStream,
}

impl Format {
    /// From the response's headers: `application/json` (or `application/*+json`) and
    /// `text/event-stream`, with any parameters; `None` for anything else, and for a body
    /// with a `Content-Encoding` other than `identity` (passed through, never decoded).
    pub fn of(headers: &HeaderMap) -> Option<Format> {
        for encoding in headers.get_all(CONTENT_ENCODING) {
            let identity = encoding.to_str().is_ok_and(|v| {
                v.split(',')
                    .all(|e| e.trim().eq_ignore_ascii_case("identity"))
            });
            if !identity {
                return None;
            }
        }
        let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
        let essence = value.split(';').next()?.trim().to_ascii_lowercase();
        match essence.as_str() {
            "text/event-stream" => Some(Format::EventStream),
            "application/json" => Some(Format::Json),
            t if t.starts_with("application/") && t.ends_with("+json") => Some(Format::Json),
            _ => None,
        }
    }
}

/// Largest figure taken (the store's integers stay exact below 2^53).
const MAX_FIGURE: u64 = (1 << 52) - 1;
/// Keys longer than this cannot be `usage` or a field name: they are not kept.
const KEY_MAX: usize = 24;

/// What the scanner expects next in an object it follows (the top level, or `usage`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Key,
    Colon,
    Value,
    Comma,
}

/// Whose value comes after the colon.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Member {
    Other,
    /// `usage`, at the top level.
    Usage,
    /// The field asked for, inside `usage`.
    Field,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Text {
    Outside,
    /// Inside a string: a key being read (`true`) or a string to skip.
    Inside {
        key: bool,
        escaped: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Number {
    None,
    Digits(u64),
    Bad,
}

/// One JSON text, scanned for its top-level `usage.<field>`.
#[derive(Clone)]
struct Json {
    field: Field,
    /// Containers open (objects and arrays alike).
    depth: u32,
    /// The top-level value is an object.
    top_object: bool,
    /// The container at depth 2 is the top-level `usage` object.
    in_usage: bool,
    /// Where the top-level object and the `usage` object are.
    expect: [Expect; 2],
    member: [Member; 2],
    text: Text,
    key: [u8; KEY_MAX],
    /// Bytes of the key read; `usize::MAX` once it cannot match (too long, escaped).
    key_len: usize,
    number: Number,
    /// The field's value inside the `usage` object being read.
    pending: Option<u64>,
    /// The field's value of the last whole `usage` object.
    figure: Option<u64>,
    /// The text cannot be JSON any more: nothing more is read.
    broken: bool,
}

impl Json {
    fn new(field: Field) -> Json {
        Json {
            field,
            depth: 0,
            top_object: false,
            in_usage: false,
            expect: [Expect::Key; 2],
            member: [Member::Other; 2],
            text: Text::Outside,
            key: [0; KEY_MAX],
            key_len: 0,
            number: Number::None,
            pending: None,
            figure: None,
            broken: false,
        }
    }

    fn reset(&mut self) {
        *self = Json::new(self.field);
    }

    /// The object level the scanner follows at the current depth: 0 for the top-level
    /// object, 1 for `usage`.
    fn level(&self) -> Option<usize> {
        match self.depth {
            1 if self.top_object => Some(0),
            2 if self.in_usage => Some(1),
            _ => None,
        }
    }

    /// A value (other than an object or array) has begun at `level`.
    fn value_seen(&mut self, level: usize) {
        self.expect[level] = Expect::Comma;
    }

    /// The number being read (if any) ended.
    fn end_number(&mut self) {
        match std::mem::replace(&mut self.number, Number::None) {
            Number::None => {}
            Number::Digits(n) => self.pending = Some(n),
            Number::Bad => self.pending = None,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.broken {
            if let Text::Inside { key, escaped } = self.text {
                bytes = self.in_string(bytes, key, escaped);
                continue;
            }
            let b = bytes[0];
            bytes = &bytes[1..];
            if self.number != Number::None {
                if b.is_ascii_digit() {
                    if let Number::Digits(n) = self.number {
                        let next = n
                            .checked_mul(10)
                            .and_then(|n| n.checked_add(u64::from(b - b'0')))
                            .filter(|&n| n <= MAX_FIGURE);
                        self.number = next.map_or(Number::Bad, Number::Digits);
                    }
                    continue;
                }
                if matches!(b, b'.' | b'e' | b'E' | b'+' | b'-') {
                    self.number = Number::Bad;
                    continue;
                }
                self.end_number();
            }
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'"' => {
                    let key = match self.level() {
                        Some(level) if self.expect[level] == Expect::Key => true,
                        Some(level) => {
                            self.value_seen(level);
                            false
                        }
                        None => false,
                    };
                    self.key_len = 0;
                    self.text = Text::Inside {
                        key,
                        escaped: false,
                    };
                }
                b':' => {
                    if let Some(level) = self.level()
                        && self.expect[level] == Expect::Colon
                    {
                        self.expect[level] = Expect::Value;
                    }
                }
                b',' => {
                    if let Some(level) = self.level() {
                        self.expect[level] = Expect::Key;
                        self.member[level] = Member::Other;
                    }
                }
                b'{' | b'[' => self.open(b == b'{'),
                b'}' | b']' => self.close(),
                _ => {
                    // A number, `true`, `false` or `null`.
                    if let Some(level) = self.level()
                        && self.expect[level] == Expect::Value
                    {
                        self.value_seen(level);
                        if level == 1 && self.member[1] == Member::Field {
                            if b.is_ascii_digit() {
                                self.number = Number::Digits(u64::from(b - b'0'));
                            } else {
                                // `-1`, `null`, `true`: not a figure (the rest of the word
                                // is skipped).
                                self.pending = None;
                            }
                        }
                    }
                }
            }
        }
    }

    fn open(&mut self, object: bool) {
        match self.depth {
            0 => {
                self.top_object = object;
                self.expect[0] = Expect::Key;
            }
            1 if self.top_object => {
                if self.expect[0] == Expect::Value && self.member[0] == Member::Usage && object {
                    self.in_usage = true;
                    self.expect[1] = Expect::Key;
                    self.member[1] = Member::Other;
                    self.pending = None;
                }
                self.value_seen(0);
            }
            2 if self.in_usage => {
                self.value_seen(1);
                if self.member[1] == Member::Field {
                    self.pending = None;
                }
            }
            _ => {}
        }
        self.depth = self.depth.saturating_add(1);
    }

    fn close(&mut self) {
        if self.depth == 0 {
            self.broken = true;
            return;
        }
        if self.depth == 2 && self.in_usage {
            self.in_usage = false;
            self.figure = self.pending.take();
        }
        self.depth -= 1;
    }

    /// Reads string bytes up to the closing quote; returns what follows.
    fn in_string<'a>(&mut self, bytes: &'a [u8], key: bool, mut escaped: bool) -> &'a [u8] {
        let mut rest = bytes;
        if escaped {
            // The byte after a backslash is never the end of the string.
            self.key_len = usize::MAX;
            rest = &rest[1..];
            escaped = false;
        }
        let Some(at) = memchr::memchr2(b'"', b'\\', rest) else {
            if key {
                self.push_key(rest);
            }
            self.text = Text::Inside { key, escaped };
            return &[];
        };
        if key {
            self.push_key(&rest[..at]);
        }
        if rest[at] == b'\\' {
            self.key_len = usize::MAX;
            self.text = Text::Inside { key, escaped: true };
            return &rest[at + 1..];
        }
        self.text = Text::Outside;
        if key {
            self.end_key();
        }
        &rest[at + 1..]
    }

    fn push_key(&mut self, part: &[u8]) {
        if self.key_len == usize::MAX {
            return;
        }
        let end = self.key_len + part.len();
        if end > KEY_MAX {
            self.key_len = usize::MAX;
            return;
        }
        self.key[self.key_len..end].copy_from_slice(part);
        self.key_len = end;
    }

    fn end_key(&mut self) {
        let Some(level) = self.level() else { return };
        let name = (self.key_len != usize::MAX).then(|| &self.key[..self.key_len]);
        self.member[level] = match (level, name) {
            (0, Some(b"usage")) => Member::Usage,
            (1, Some(n)) if n == self.field.key().as_bytes() => Member::Field,
            _ => Member::Other,
        };
        if self.member[level] == Member::Field {
            // A repeated key: its last value counts.
            self.pending = None;
        }
        self.expect[level] = Expect::Colon;
    }
}

/// Where an event stream's line reader is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line.
    Start,
    /// In a field name; `matched` bytes of `data` so far (`usize::MAX`: not `data`).
    Name { matched: usize },
    /// Just after `data:`: one space may follow.
    DataStart,
    /// In a `data` value: bytes go to the JSON scanner.
    Data,
    /// In a line that does not matter (another field, a comment).
    Skip,
}

/// An event stream's events, each one's data scanned as JSON.
struct Events {
    line: Line,
    /// The previous byte was a CR (a LF right after it ends the same line).
    after_cr: bool,
    /// The current event has had a data line (the next one is joined with a newline).
    has_data: bool,
    json: Json,
    /// The figure of the last event that had one.
    figure: Option<u64>,
    usage: memchr::memmem::Finder<'static>,
}

impl Events {
    fn feed(&mut self, mut bytes: &[u8]) {
        while let Some(&b) = bytes.first() {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    bytes = &bytes[1..];
                    continue;
                }
            }
            match self.line {
                Line::Data | Line::Skip => {
                    let at = memchr::memchr2(b'\n', b'\r', bytes);
                    let end = at.unwrap_or(bytes.len());
                    if self.line == Line::Data {
                        self.json.feed(&bytes[..end]);
                    }
                    match at {
                        Some(at) => {
                            self.end_of_line(bytes[at]);
                            bytes = &bytes[at + 1..];
                        }
                        None => return,
                    }
                }
                Line::Start => {
                    if b == b'\n' || b == b'\r' {
                        self.after_cr = b == b'\r';
                        self.dispatch();
                    } else {
                        self.line = Line::Name { matched: 0 };
                        continue;
                    }
                    bytes = &bytes[1..];
                }
                Line::Name { matched } => {
                    bytes = &bytes[1..];
                    match b {
                        b':' if matched == 4 => self.line = Line::DataStart,
                        b':' => self.line = Line::Skip,
                        b'\n' | b'\r' => {
                            if matched == 4 {
                                // `data` alone: an empty data line.
                                self.data_line();
                            }
                            self.end_of_line(b);
                        }
                        _ => {
                            let next = if matched < 4 && b"data"[matched] == b {
                                matched + 1
                            } else {
                                usize::MAX
                            };
                            self.line = Line::Name { matched: next };
                        }
                    }
                }
                Line::DataStart => {
                    if !self.has_data
                        && let Some(rest) = self.without_usage(bytes)
                    {
                        // A whole one-line event that cannot carry a figure: skipped.
                        bytes = rest;
                        self.line = Line::Start;
                        continue;
                    }
                    self.data_line();
                    self.line = Line::Data;
                    if b == b' ' {
                        bytes = &bytes[1..];
                    }
                }
            }
        }
    }

    /// When `bytes` (just after an event's first `data:`) hold that whole line and the blank
    /// line ending the event, and the line cannot report a figure ([`Events::may_report`]): what
    /// follows the event.
    /// Such an event cannot report a figure, so its JSON need not be read (most of a stream
    /// is such chunks: this is what makes scanning cheap).
    fn without_usage<'a>(&self, bytes: &'a [u8]) -> Option<&'a [u8]> {
        let at = memchr::memchr2(b'\n', b'\r', bytes)?;
        let mut next = at + 1;
        if bytes[at] == b'\r' && bytes.get(next) == Some(&b'\n') {
            next += 1;
        }
        let blank = *bytes.get(next)?;
        if blank != b'\n' && blank != b'\r' {
            return None;
        }
        let mut end = next + 1;
        if blank == b'\r' {
            // CRLF, or a lone CR with the next byte not yet seen: leave it to the slow path
            // unless the LF is here.
            match bytes.get(end) {
                Some(b'\n') => end += 1,
                Some(_) => {}
                None => return None,
            }
        }
        if self.may_report(&bytes[..at]) {
            return None;
        }
        Some(&bytes[end..])
    }

    /// Whether `line` holds `"usage"` followed by `:` and `{` (with any whitespace between):
    /// the only way an event reports a figure. `"usage":null`, which OpenAI puts in every
    /// chunk, does not.
    fn may_report(&self, line: &[u8]) -> bool {
        self.usage.find_iter(line).any(|at| {
            let mut after = line[at + 7..]
                .iter()
                .copied()
                .filter(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
            match after.next() {
                Some(b':') => !matches!(after.next(), Some(b) if b != b'{'),
                None => true,
                Some(_) => false,
            }
        })
    }

    /// A data line begins: joined to the previous one with a newline.
    fn data_line(&mut self) {
        if self.has_data {
            self.json.feed(b"\n");
        }
        self.has_data = true;
    }

    fn end_of_line(&mut self, b: u8) {
        self.after_cr = b == b'\r';
        self.line = Line::Start;
    }

    /// A blank line: the event is complete.
    fn dispatch(&mut self) {
        if self.has_data
            && let Some(figure) = self.json.figure
        {
            self.figure = Some(figure);
        }
        self.has_data = false;
        self.json.reset();
    }
}

enum Body {
    Json(Json),
    Events(Box<Events>),
}

/// Reads one response body for its `usage` figure.
pub struct Scanner {
    body: Body,
}

impl Scanner {
    pub fn new(field: Field, format: Format) -> Scanner {
        let json = Json::new(field);
        let body = match format {
            Format::Json => Body::Json(json),
            Format::EventStream => Body::Events(Box::new(Events {
                line: Line::Start,
                after_cr: false,
                has_data: false,
                json,
                figure: None,
                usage: memchr::memmem::Finder::new(b"\"usage\""),
            })),
        };
        Scanner { body }
    }

    /// The next bytes of the body, split anywhere.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.body {
            Body::Json(json) => json.feed(chunk),
            Body::Events(events) => events.feed(chunk),
        }
    }

    /// The figure, once the body has ended (`None`: no usable figure).
    pub fn finish(self) -> Option<u64> {
        match self.body {
            Body::Json(json) => json.figure,
            Body::Events(mut events) => {
                // A last event without its blank line still counts.
                events.dispatch();
                events.figure
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scan(field: Field, format: Format, body: &[u8]) -> Option<u64> {
        let mut s = Scanner::new(field, format);
        s.feed(body);
        s.finish()
    }

    fn json(body: &str) -> Option<u64> {
        scan(Field::Total, Format::Json, body.as_bytes())
    }

    fn sse(body: &str) -> Option<u64> {
        scan(Field::Total, Format::EventStream, body.as_bytes())
    }

    /// The same figure whatever the split: at every position in two, and byte by byte.
    fn same_split_anywhere(field: Field, format: Format, body: &[u8]) -> Option<u64> {
        let whole = scan(field, format, body);
        for at in 0..=body.len() {
            let mut s = Scanner::new(field, format);
            s.feed(&body[..at]);
            s.feed(&body[at..]);
            assert_eq!(s.finish(), whole, "split at {at}");
        }
        let mut s = Scanner::new(field, format);
        for b in body {
            s.feed(std::slice::from_ref(b));
        }
        assert_eq!(s.finish(), whole, "byte by byte");
        whole
    }

    const COMPLETION: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"the \"usage\": {\"total_tokens\": 5} is in a string","usage":{"total_tokens":999}}}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#;

    #[test]
    fn the_top_level_usage_of_a_completion() {
        assert_eq!(json(COMPLETION), Some(21));
        assert_eq!(
            scan(Field::Prompt, Format::Json, COMPLETION.as_bytes()),
            Some(9)
        );
        assert_eq!(
            scan(Field::Completion, Format::Json, COMPLETION.as_bytes()),
            Some(12)
        );
        assert_eq!(
            same_split_anywhere(Field::Total, Format::Json, COMPLETION.as_bytes()),
            Some(21)
        );
    }

    #[test]
    fn usage_first_last_or_in_the_middle_and_spaced_out() {
        assert_eq!(
            json(r#"{"usage":{"total_tokens":3},"choices":[]}"#),
            Some(3)
        );
        assert_eq!(
            json(r#"{"a":1,"usage":{"total_tokens":4},"b":[1,{"c":2}]}"#),
            Some(4)
        );
        assert_eq!(
            json("{\n  \"usage\" :\t{ \"prompt_tokens\" : 1 ,\r\n \"total_tokens\" : 17 } \n}\n"),
            Some(17)
        );
        assert_eq!(json(r#"{"usage":{"total_tokens":0}}"#), Some(0));
    }

    #[test]
    fn no_figure_when_there_is_none_to_take() {
        for body in [
            r#"{"usage":null}"#,
            r#"{"usage":{"prompt_tokens":3}}"#,
            r#"{"choices":[{"usage":{"total_tokens":5}}]}"#,
            r#"[{"usage":{"total_tokens":5}}]"#,
            r#"{"data":{"usage":{"total_tokens":5}}}"#,
            r#"{"usage":{"total_tokens":12.5}}"#,
            r#"{"usage":{"total_tokens":1e3}}"#,
            r#"{"usage":{"total_tokens":-1}}"#,
            r#"{"usage":{"total_tokens":"12"}}"#,
            r#"{"usage":{"total_tokens":null}}"#,
            r#"{"usage":{"total_tokens":{"n":1}}}"#,
            r#"{"usage":{"total_tokens":99999999999999999999}}"#,
            r#"{"\u0075sage":{"total_tokens":5}}"#,
            r#"{"usage":{"total_tokens":5"#,
            "",
            "not json",
        ] {
            assert_eq!(json(body), None, "{body}");
        }
        assert_eq!(
            json(&format!(r#"{{"usage":{{"total_tokens":{MAX_FIGURE}}}}}"#)),
            Some(MAX_FIGURE)
        );
    }

    #[test]
    fn escapes_in_strings_do_not_confuse_it() {
        let body = r#"{"content":"a \\\" quote, a \\\\ backslash\\\\","usage":{"total_tokens":8}}"#;
        assert_eq!(json(body), Some(8));
        let body = r#"{"content":"ends in a backslash \\\\","usage":{"total_tokens":6}}"#;
        assert_eq!(
            same_split_anywhere(Field::Total, Format::Json, body.as_bytes()),
            Some(6)
        );
        let body = r#"{"a\"usage":{"total_tokens":5},"usage":{"total_tokens":7}}"#;
        assert_eq!(json(body), Some(7));
    }

    fn chunk(i: usize) -> String {
        format!(
            "data: {{\"id\":\"chatcmpl-1\",\"choices\":[{{\"delta\":{{\"content\":\"word {i}\"}}}}],\"usage\":null}}\n\n"
        )
    }

    #[test]
    fn the_last_usage_event_of_a_stream() {
        let mut body: String = (0..100).map(chunk).collect();
        body.push_str("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21}}\n\n");
        body.push_str("data: [DONE]\n\n");
        assert_eq!(sse(&body), Some(21));
        assert_eq!(
            scan(Field::Completion, Format::EventStream, body.as_bytes()),
            Some(12)
        );
        let small = format!(
            "{}data: {{\"usage\":{{\"total_tokens\":4}}}}\n\ndata: [DONE]\n\n",
            chunk(0)
        );
        assert_eq!(
            same_split_anywhere(Field::Total, Format::EventStream, small.as_bytes()),
            Some(4)
        );
        // Spaced out, and a decoy in a string: the quick check of one-line events lets both
        // through to the scanner, which takes the real one.
        let spaced = "data: {\"c\":\"\\\"usage\\\": {\",\"usage\" :\t {\"total_tokens\": 5}}\n\n";
        assert_eq!(
            same_split_anywhere(Field::Total, Format::EventStream, spaced.as_bytes()),
            Some(5)
        );
        let null_then_nested =
            "data: {\"usage\": null, \"x\": {\"usage\": {\"total_tokens\": 5}}}\n\n";
        assert_eq!(sse(null_then_nested), None);
    }

    #[test]
    fn line_endings_fields_comments_and_joined_data_lines() {
        let crlf = ": a comment\r\nevent: message\r\nid: 7\r\ndata: {\"usage\":\r\ndata: {\"total_tokens\":5}}\r\n\r\ndata: [DONE]\r\n\r\n";
        assert_eq!(
            same_split_anywhere(Field::Total, Format::EventStream, crlf.as_bytes()),
            Some(5)
        );
        let cr = "data:{\"usage\":{\"total_tokens\":6}}\r\rdata: [DONE]\r\r";
        assert_eq!(
            same_split_anywhere(Field::Total, Format::EventStream, cr.as_bytes()),
            Some(6)
        );
        // Not a data field: `database:`, `dat:`.
        assert_eq!(sse("database: {\"usage\":{\"total_tokens\":5}}\n\n"), None);
        assert_eq!(sse("dat: {\"usage\":{\"total_tokens\":5}}\n\n"), None);
    }

    #[test]
    fn an_unterminated_last_event_counts_and_null_does_not_clear() {
        assert_eq!(sse("data: {\"usage\":{\"total_tokens\":3}}"), Some(3));
        assert_eq!(sse("data: {\"usage\":{\"total_tokens\":3}}\n"), Some(3));
        let body = "data: {\"usage\":{\"total_tokens\":3}}\n\ndata: {\"usage\":null}\n\n";
        assert_eq!(sse(body), Some(3));
        let body =
            "data: {\"usage\":{\"total_tokens\":3}}\n\ndata: {\"usage\":{\"total_tokens\":8}}\n\n";
        assert_eq!(sse(body), Some(8));
        // Each event is its own JSON text: a broken one does not spoil the next.
        let body = "data: {\"usage\":}}}\n\ndata: {\"usage\":{\"total_tokens\":2}}\n\n";
        assert_eq!(sse(body), Some(2));
    }

    #[test]
    fn formats_from_headers() {
        let of = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            Format::of(&h)
        };
        assert_eq!(
            of(&[("content-type", "application/json")]),
            Some(Format::Json)
        );
        assert_eq!(
            of(&[("content-type", "Application/JSON; charset=utf-8")]),
            Some(Format::Json)
        );
        assert_eq!(
            of(&[("content-type", "application/problem+json")]),
            Some(Format::Json)
        );
        assert_eq!(
            of(&[("content-type", "text/event-stream; charset=utf-8")]),
            Some(Format::EventStream)
        );
        assert_eq!(
            of(&[
                ("content-type", "application/json"),
                ("content-encoding", "identity")
            ]),
            Some(Format::Json)
        );
        assert_eq!(
            of(&[
                ("content-type", "application/json"),
                ("content-encoding", "gzip")
            ]),
            None
        );
        assert_eq!(of(&[("content-type", "text/plain")]), None);
        assert_eq!(of(&[]), None);
    }

    proptest! {
        #[test]
        fn random_splits_agree(cut in proptest::collection::vec(0usize..400, 0..6), total in 0u64..1_000_000) {
            let body = format!(
                "{}data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"total_tokens\":{total}}}}}\r\n\r\ndata: [DONE]\n\n",
                chunk(3)
            );
            let bytes = body.as_bytes();
            let mut cuts: Vec<usize> = cut.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort();
            let mut s = Scanner::new(Field::Total, Format::EventStream);
            let mut from = 0;
            for c in cuts {
                s.feed(&bytes[from..c]);
                from = c;
            }
            s.feed(&bytes[from..]);
            prop_assert_eq!(s.finish(), Some(total));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for format in [Format::Json, Format::EventStream] {
                let mut s = Scanner::new(Field::Total, format);
                s.feed(&bytes);
                s.feed(&bytes);
                let _ = s.finish();
            }
        }

        #[test]
        fn json_like_noise_never_panics(parts in proptest::collection::vec(
            prop_oneof![Just("{"), Just("}"), Just("["), Just("]"), Just("\""), Just("\\"),
                        Just(":"), Just(","), Just("usage"), Just("total_tokens"), Just("12"),
                        Just("data: "), Just("\n"), Just("\r")], 0..80)) {
            let body: String = parts.concat();
            for format in [Format::Json, Format::EventStream] {
                let _ = scan(Field::Total, format, body.as_bytes());
            }
        }
    }
}
