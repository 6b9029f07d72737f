//! `--log-format json`: one JSON object per line whose keys are unique.
//!
//! tracing-subscriber's JSON format writes the event's module path under `target`, next to
//! the event's own fields; an event with a field named `target` (a dial target) then had
//! the key twice, and `jq` and Python kept the module path and lost the target. Here the
//! module path is `module`, the keys this format writes itself (`timestamp`, `level`,
//! `module`, `span`, `spans`) are reserved (an event field of one of those names is written
//! as `field.NAME`), and every key appears once by construction.

use std::collections::HashSet;
use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Keys the line itself writes; event fields of these names are prefixed with `field.`.
const RESERVED: [&str; 5] = ["timestamp", "level", "module", "span", "spans"];

/// The event formatter of `--log-format json` (with [`JsonFields`] for span fields).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

/// A log line being built: keys in the order written, each once.
#[derive(Debug, Default)]
pub struct Line {
    entries: Vec<(String, Value)>,
    seen: HashSet<String>,
}

impl Line {
    /// A line with the timestamp (now) and the level.
    pub fn new(level: &str) -> Self {
        let mut line = Self::default();
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
        line.put("timestamp", Value::String(now));
        line.put("level", Value::String(level.to_owned()));
        line
    }

    /// Adds an event field; a reserved or repeated name gets a `field.` prefix (repeated:
    /// until unique), so nothing is lost and no key repeats.
    pub fn field(&mut self, name: &str, value: Value) {
        let mut key = if RESERVED.contains(&name) {
            format!("field.{name}")
        } else {
            name.to_owned()
        };
        while self.seen.contains(&key) {
            key = format!("field.{key}");
        }
        self.put(&key, value);
    }

    /// Adds a key the line writes itself (the module, spans).
    pub fn put(&mut self, key: &str, value: Value) {
        self.seen.insert(key.to_owned());
        self.entries.push((key.to_owned(), value));
    }

    /// The line as one JSON object, without a newline.
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // Serializing a string or a `Value` cannot fail.
            out.push_str(&serde_json::to_string(k).unwrap_or_default());
            out.push(':');
            out.push_str(&serde_json::to_string(v).unwrap_or_default());
        }
        out.push('}');
        out
    }
}

/// Collects an event's fields as JSON values.
struct Fields<'a>(&'a mut Line);

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.0.field(field.name(), v);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.field(field.name(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.field(field.name(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.field(field.name(), Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.field(field.name(), Value::String(value.to_owned()));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.field(field.name(), Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .field(field.name(), Value::String(format!("{value:?}")));
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Line::new(meta.level().as_str());
        event.record(&mut Fields(&mut line));
        line.put("module", Value::String(meta.target().to_owned()));
        let mut spans = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let mut object = Map::new();
                object.insert("name".into(), Value::String(span.name().to_owned()));
                if let Some(fields) = span.extensions().get::<FormattedFields<JsonFields>>() {
                    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields) {
                        object.extend(map);
                    }
                }
                spans.push(Value::Object(object));
            }
        }
        if let Some(current) = spans.last() {
            line.put("span", current.clone());
            line.put("spans", Value::Array(spans));
        }
        writeln!(writer, "{}", line.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_and_repeated_names_get_a_prefix() {
        let mut line = Line::new("INFO");
        line.field("message", Value::String("tunnel connection".into()));
        line.field("target", Value::String("tcp/127.0.0.1:22".into()));
        line.field("module", Value::String("mine".into()));
        line.field("target", Value::String("again".into()));
        let v: Value = serde_json::from_str(&line.to_json()).expect("one JSON object");
        assert_eq!(v["target"], "tcp/127.0.0.1:22");
        assert_eq!(v["field.module"], "mine");
        assert_eq!(v["field.target"], "again");
        assert_eq!(v["message"], "tunnel connection");
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
