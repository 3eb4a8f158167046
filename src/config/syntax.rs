//! Better words for TOML syntax errors. The toml crate reports where its parser gave up, which
//! for some common slips is a line or more after the slip, in parser terms: an unterminated
//! `rate = "5/min }` inside a `limits = [...]` array is reported on the next line as "invalid
//! inline table element". This module looks at the raw text once toml has refused it and, where
//! it finds the cause at or before toml's position, names that instead:
//!
//! - a `"…"` or `'…'` string not closed on its line (outside comments and multi-line strings):
//!   reported at its opening quote;
//! - an array `[` or inline table `{` that is closed by the other kind of bracket, or is still
//!   open at a table header or at the end of the file: reported at the opening bracket;
//! - a duplicate key or table: named, with where it was first set;
//! - a bare word as a value (`algorithm = gcra`): how to write it quoted.
//!
//! It only ever rewords an error toml found; a file toml accepts is never scanned.

/// A syntax error: a byte offset into the source and what to say there.
#[derive(Debug, PartialEq, Eq)]
pub struct Explained {
    pub offset: usize,
    pub message: String,
}

/// A better message for toml's error `message` at byte `offset` (its span `span`), if any.
/// Only for syntax errors: a file that is valid TOML (the error came from the serde mapping:
/// unknown or missing fields, wrong types) keeps toml's words.
pub fn explain(
    source: &str,
    offset: usize,
    span: Option<std::ops::Range<usize>>,
    message: &str,
) -> Option<Explained> {
    if source.parse::<toml::Table>().is_ok() {
        return None;
    }
    if let Some(found) = scan(source).filter(|e| e.offset <= offset) {
        return Some(found);
    }
    let span = span?;
    let text = source.get(span.clone())?;
    if message == "duplicate key" {
        return Some(duplicate(source, span.start, text));
    }
    if message.starts_with("string values must be quoted") {
        let line_start = source[..span.start].rfind('\n').map_or(0, |i| i + 1);
        let key = source[line_start..span.start]
            .trim_end()
            .strip_suffix('=')
            .map(|k| k.trim_end())
            .and_then(|k| k.rsplit([' ', '{', ',', '\t']).next())
            .filter(|k| !k.is_empty());
        let example = match key {
            Some(key) => format!("{key} = \"{text}\""),
            None => format!("\"{text}\""),
        };
        return Some(Explained {
            offset: span.start,
            message: format!("unquoted value {text}; string values must be quoted: {example}"),
        });
    }
    None
}

/// "duplicate key `name`, first set at 8:1" at the key, or "duplicate table
/// [upstreams.api], first defined at 4:1" at the header; `at` is the offset of the second
/// occurrence, `key` its text.
fn duplicate(source: &str, at: usize, key: &str) -> Explained {
    let line_start = source[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = source[line_start..].lines().next().unwrap_or("");
    let before = &source[..line_start];
    let position = |offset: usize| {
        let (line, column) = super::line_column(source, offset);
        format!("{line}:{column}")
    };
    let indented = |start: usize| {
        let text = &source[start..];
        start + text.len() - text.trim_start_matches([' ', '\t']).len()
    };
    if line.trim_start().starts_with('[') {
        // A table header: the same header earlier in the file.
        let header = normalise_header(line);
        let first = line_starts(before).find(|&start| {
            normalise_header(source[start..].lines().next().unwrap_or("")) == header
        });
        let first = match first {
            Some(start) => format!(", first defined at {}", position(indented(start))),
            None => String::new(),
        };
        let indent = line.len() - line.trim_start().len();
        return Explained {
            offset: line_start + indent,
            message: format!("duplicate table {header}{first}; a table may be defined only once"),
        };
    }
    // A key: earlier on the same line (an inline table), or on an earlier line of the same
    // table (back to the previous header).
    let sets = |text: &str| {
        let t = text.trim_start();
        t.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    };
    let same_line = source[line_start..at]
        .match_indices(key)
        .map(|(i, _)| line_start + i)
        .find(|&i| {
            let prev = source[line_start..i].chars().next_back();
            matches!(prev, Some(' ' | '{' | ',' | '\t')) && sets(&source[i..at])
        });
    let earlier = if same_line.is_some() {
        same_line
    } else {
        let mut starts: Vec<usize> = line_starts(before).collect();
        starts.reverse();
        starts
            .into_iter()
            .take_while(|&s| !source[s..].trim_start().starts_with('['))
            .find(|&s| sets(source[s..].lines().next().unwrap_or("")))
            .map(indented)
    };
    let first = match earlier {
        Some(offset) => format!(", first set at {}", position(offset)),
        None => String::new(),
    };
    Explained {
        offset: at,
        message: format!("duplicate key `{key}`{first}; a key may be set only once in a table"),
    }
}

/// Byte offsets of the starts of the lines of `text`.
fn line_starts(text: &str) -> impl Iterator<Item = usize> + '_ {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .filter(move |&i| i < text.len())
}

/// `[ a . b ]  # x` -> `[a.b]`; `[[routes]]` stays.
fn normalise_header(line: &str) -> String {
    let line = line.split('#').next().unwrap_or("");
    line.chars().filter(|c| !c.is_whitespace()).collect()
}

/// Whether `line` (inside an open array or inline table) reads as a table header: `[a.b]` or
/// `[[a]]` of bare keys alone on its line, which no array element looks like.
fn is_header(line: &str) -> bool {
    let t = line.split('#').next().unwrap_or("").trim();
    let inner = t
        .strip_prefix("[[")
        .and_then(|r| r.strip_suffix("]]"))
        .or_else(|| t.strip_prefix('[').and_then(|r| r.strip_suffix(']')));
    inner.is_some_and(|k| {
        !k.trim().is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
    })
}

/// The first unterminated string or unbalanced bracket in `source`, if any.
fn scan(source: &str) -> Option<Explained> {
    // Open brackets of values: (the bracket, its offset).
    let mut open: Vec<(u8, usize)> = Vec::new();
    let bytes = source.as_bytes();
    let mut i = 0;
    let mut line_start = true;
    while i < bytes.len() {
        if line_start {
            line_start = false;
            let end = source[i..].find('\n').map_or(source.len(), |n| i + n);
            let line = &source[i..end];
            if line.trim_start().starts_with('[') && (open.is_empty() || is_header(line)) {
                if let Some(&(bracket, at)) = open.last() {
                    let (line, _) = super::line_column(source, i);
                    let until = format!(" before the table header on line {line}");
                    return Some(unclosed(bracket, at, &until));
                }
                // A table header: nothing to track on it.
                i = end;
                continue;
            }
        }
        match bytes[i] {
            b'\n' => {
                line_start = true;
                i += 1;
            }
            b'#' => i = source[i..].find('\n').map_or(source.len(), |n| i + n),
            quote @ (b'"' | b'\'') => {
                let triple = [quote; 3];
                if bytes[i..].starts_with(&triple) {
                    // A multi-line string: skip to its end (toml reports one left open).
                    let mut j = i + 3;
                    loop {
                        match source[j..].find(std::str::from_utf8(&triple).expect("ascii")) {
                            None => return None,
                            Some(n) if quote == b'"' && escaped(bytes, j + n) => j += n + 1,
                            Some(n) => {
                                j += n + 3;
                                break;
                            }
                        }
                    }
                    // Up to two more quotes may belong to the string's content.
                    while j < bytes.len() && bytes[j] == quote {
                        j += 1;
                    }
                    i = j;
                    continue;
                }
                let mut j = i + 1;
                loop {
                    match bytes.get(j) {
                        None | Some(b'\n') | Some(b'\r') => {
                            return Some(Explained {
                                offset: i,
                                message: format!(
                                    "unterminated string: this `{}` is not closed on its line",
                                    quote as char
                                ),
                            });
                        }
                        // An escape, unless it escapes the end of the line.
                        Some(b'\\') if quote == b'"' && bytes.get(j + 1) != Some(&b'\n') => j += 2,
                        Some(&c) if c == quote => break,
                        Some(_) => j += 1,
                    }
                }
                i = j + 1;
            }
            bracket @ (b'[' | b'{') => {
                open.push((bracket, i));
                i += 1;
            }
            closer @ (b']' | b'}') => {
                let wanted = if closer == b']' { b'[' } else { b'{' };
                match open.pop() {
                    Some((bracket, _)) if bracket == wanted => {}
                    Some((bracket, at)) => {
                        let (line, column) = super::line_column(source, i);
                        let until =
                            format!(" (a `{}` at {line}:{column} came first)", closer as char);
                        return Some(unclosed(bracket, at, &until));
                    }
                    // A stray closer: toml's own words are as good.
                    None => return None,
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    open.last()
        .map(|&(bracket, at)| unclosed(bracket, at, " before the end of the file"))
}

/// Whether the byte at `at` is preceded by an odd number of backslashes.
fn escaped(bytes: &[u8], at: usize) -> bool {
    bytes[..at]
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count()
        % 2
        == 1
}

/// "unclosed array: this `[` has no matching `]`" and `until`, at the bracket.
fn unclosed(bracket: u8, at: usize, until: &str) -> Explained {
    let (what, closer) = if bracket == b'[' {
        ("array", ']')
    } else {
        ("inline table", '}')
    };
    Explained {
        offset: at,
        message: format!(
            "unclosed {what}: this `{}` has no matching `{closer}`{until}",
            bracket as char
        ),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::sample::Index;

    proptest! {
        /// Whatever the text and wherever toml's span falls (on a character boundary, as
        /// toml's do), explaining never panics.
        #[test]
        fn never_panics(
            text in "[a-z =\"'\\[\\]{}#\n\\\\é,.]{0,80}",
            start in any::<Index>(),
            len in 0..6usize,
        ) {
            let bounds: Vec<usize> = text
                .char_indices()
                .map(|(i, _)| i)
                .chain([text.len()])
                .collect();
            let at = bounds[start.index(bounds.len())];
            let end = bounds.iter().copied().find(|&b| b >= at + len).unwrap_or(text.len());
            for message in ["duplicate key", "string values must be quoted", "other"] {
                let _ = super::explain(&text, at, Some(at..end), message);
            }
        }
    }
}
