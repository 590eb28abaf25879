//! One line of results: ordered `key=value` fields, printed as text or as a JSON object.

use hdrhistogram::Histogram;
use serde_json::{Map, Value};
use std::time::Duration;

/// The results of one scenario (or one step of it).
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub scenario: String,
    fields: Vec<(String, Value)>,
}

impl Report {
    pub fn new(scenario: &str) -> Self {
        Report {
            scenario: scenario.to_owned(),
            fields: Vec::new(),
        }
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        let value = value.into();
        match self.fields.iter_mut().find(|(name, _)| name == key) {
            Some((_, slot)) => *slot = value,
            None => self.fields.push((key.to_owned(), value)),
        }
        self
    }

    /// A number rounded to `digits` decimals.
    pub fn num(&mut self, key: &str, value: f64, digits: i32) -> &mut Self {
        if !value.is_finite() {
            return self.set(key, Value::Null);
        }
        if digits <= 0 {
            return self.set(key, value.round() as i64);
        }
        let scale = 10f64.powi(digits);
        let rounded = (value * scale).round() / scale;
        self.set(key, rounded)
    }

    /// p50, p99 and p99.9 of a histogram of microseconds, in milliseconds.
    pub fn latency(&mut self, prefix: &str, histogram: &Histogram<u64>) -> &mut Self {
        for (name, quantile) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            let micros = if histogram.is_empty() {
                0
            } else {
                histogram.value_at_quantile(quantile)
            };
            self.num(&format!("{prefix}{name}_ms"), micros as f64 / 1000.0, 3);
        }
        self
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value)
    }

    pub fn get_f64(&self, key: &str) -> f64 {
        self.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
    }

    pub fn get_u64(&self, key: &str) -> u64 {
        self.get(key).and_then(Value::as_u64).unwrap_or(0)
    }

    pub fn line(&self) -> String {
        let mut line = self.scenario.clone();
        for (key, value) in &self.fields {
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            line.push_str(&format!(" {key}={text}"));
        }
        line
    }

    pub fn json(&self) -> Value {
        let mut object = Map::new();
        object.insert("scenario".into(), Value::String(self.scenario.clone()));
        for (key, value) in &self.fields {
            object.insert(key.clone(), value.clone());
        }
        Value::Object(object)
    }
}

/// A histogram of microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}
