//! Parsers of numeric flags: every number is checked before any work (a NaN learning rate or
//! 100,000 threads fails at once, naming the flag, instead of deep inside libtorch). clap puts
//! the flag and the value in the error; these say what was expected.

/// A finite number in `[lo, hi]`.
pub fn number_in(lo: f64, hi: f64) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync {
    move |s: &str| {
        let v = finite(s)?;
        if v < lo || v > hi {
            return Err(format!("expected a number in [{lo}, {hi}]"));
        }
        Ok(v)
    }
}

/// A finite number in `(0, hi]`.
pub fn positive_up_to(hi: f64) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync {
    move |s: &str| {
        let v = finite(s)?;
        if v <= 0.0 || v > hi {
            return Err(format!("expected a number > 0 and <= {hi}"));
        }
        Ok(v)
    }
}

/// A finite number in `[0, 1)`.
pub fn fraction_below_one() -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync {
    |s: &str| {
        let v = finite(s)?;
        if !(0.0..1.0).contains(&v) {
            return Err("expected a number in [0, 1)".into());
        }
        Ok(v)
    }
}

fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{s} is not a finite number"));
    }
    Ok(v)
}

/// A thread count from 1 to the CPUs this process may use (its affinity mask or cgroup quota,
/// as `std::thread::available_parallelism` reads them): more threads than CPUs only contend.
pub fn threads_parser() -> impl Fn(&str) -> Result<i32, String> + Clone + Send + Sync {
    |s: &str| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let expected =
            format!("expected 1 to {cpus} (the CPUs this process may use on this machine)");
        let v: i64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a whole number; {expected}"))?;
        if v < 1 || v > cpus as i64 {
            return Err(expected);
        }
        Ok(v as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_checked() {
        let lr = positive_up_to(10.0);
        assert_eq!(lr("0.001"), Ok(0.001));
        for bad in ["NaN", "nan", "inf", "-1", "0", "11", "x", ""] {
            assert!(lr(bad).is_err(), "{bad}");
        }
        let wd = number_in(0.0, 10.0);
        assert_eq!(wd("0"), Ok(0.0));
        assert!(wd("-0.1").is_err() && wd("NaN").is_err());
        let f = fraction_below_one();
        assert!(f("0.2").is_ok() && f("1").is_err() && f("-0").is_ok());
        let t = threads_parser();
        assert_eq!(t("1"), Ok(1));
        for bad in ["0", "-3", "100000", "1.5", "two"] {
            assert!(t(bad).is_err(), "{bad}");
        }
    }
}
