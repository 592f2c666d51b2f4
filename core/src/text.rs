//! Text from outside — names, ids, errors, notes — made safe to print on a terminal: control
//! characters (C0, DEL, C1), line and paragraph separators and the Unicode bidirectional
//! overrides are written as escapes, so a name can show `\x1b[31m` but never turn the
//! terminal red, retitle its window or reorder what is shown.

/// Whether `c` would steer a terminal rather than show: C0 controls, DEL, C1 controls (U+009B
/// is a CSI to some terminals), and the Unicode bidirectional overrides and isolates that
/// reorder what is shown.
pub fn is_steering(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape_char(c: char, out: &mut String) {
    use std::fmt::Write;
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// `text` as one line a terminal shows as it is: every control character (line breaks
/// included) and bidirectional override written as an escape (`\x1b`, `\n`, `\u{202e}`).
/// For any value that came from outside — names, ids, errors, notes — before it is printed.
pub fn escape(text: &str) -> String {
    if !text.chars().any(is_steering) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_steering(c) { escape_char(c, &mut out) } else { out.push(c) }
    }
    out
}

/// [`escape`] for a whole text of several lines: line breaks stay, everything else that would
/// steer a terminal is escaped. Every human output goes through it before it is printed.
pub fn terminal(text: &str) -> String {
    if !text.chars().any(|c| c != '\n' && is_steering(c)) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c != '\n' && is_steering(c) { escape_char(c, &mut out) } else { out.push(c) }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_terminals() {
        assert_eq!(escape("plain name-1"), "plain name-1");
        assert_eq!(escape("\u{1b}[31mred\u{7}"), "\\x1b[31mred\\x07");
        assert_eq!(escape("a\nb\tc\r"), "a\\nb\\tc\\r");
        assert_eq!(escape("\u{9b}2J \u{202e}evil"), "\\u{9b}2J \\u{202e}evil");
        assert_eq!(escape("naïve 猫"), "naïve 猫");
        assert_eq!(terminal("line 1\nline \u{1b}]0;title\u{7}2\n"), "line 1\nline \\x1b]0;title\\x072\n");
    }
}
