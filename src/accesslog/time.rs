//! nginx's `$time_local` (`03/Dec/2026:19:09:00 +0000`) and `$time_iso8601`
//! (`2026-12-03T19:09:00+00:00`) in the local time zone, formatted once per second per thread.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The broken-down local time of a unix second.
struct Local {
    year: i32,
    month: usize,
    day: i32,
    hour: i32,
    min: i32,
    sec: i32,
    /// Seconds east of UTC.
    offset: i64,
}

fn local_time(secs: i64) -> Local {
    // SAFETY: `tm` is plain data that localtime_r fills in; `t` outlives the call.
    let tm = unsafe {
        let t: libc::time_t = secs as libc::time_t;
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            libc::gmtime_r(&t, &mut tm);
        }
        tm
    };
    Local {
        year: tm.tm_year + 1900,
        month: tm.tm_mon.clamp(0, 11) as usize,
        day: tm.tm_mday,
        hour: tm.tm_hour,
        min: tm.tm_min,
        sec: tm.tm_sec,
        offset: tm.tm_gmtoff,
    }
}

/// The second and both formats of it, per thread: a busy worker formats each only once a
/// second (localtime_r takes glibc's time zone lock).
struct Cached {
    secs: i64,
    local: String,
    iso: String,
}

thread_local! {
    static CACHE: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn with_cached<R>(f: impl FnOnce(&Cached) -> R) -> R {
    let secs = now_secs();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|c| c.secs != secs) {
            let t = local_time(secs);
            *c = Some(Cached {
                secs,
                local: format_local(&t),
                iso: format_iso(&t),
            });
        }
        f(c.as_ref().expect("filled above"))
    })
}

fn offset_parts(offset: i64) -> (char, i64, i64) {
    let sign = if offset < 0 { '-' } else { '+' };
    let abs = offset.abs();
    (sign, abs / 3600, (abs % 3600) / 60)
}

fn format_local(t: &Local) -> String {
    let (sign, oh, om) = offset_parts(t.offset);
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} {sign}{oh:02}{om:02}",
        t.day, MONTHS[t.month], t.year, t.hour, t.min, t.sec
    )
}

fn format_iso(t: &Local) -> String {
    let (sign, oh, om) = offset_parts(t.offset);
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}{sign}{oh:02}:{om:02}",
        t.year,
        t.month + 1,
        t.day,
        t.hour,
        t.min,
        t.sec
    )
}

/// `$time_local` now.
pub fn local() -> String {
    with_cached(|c| c.local.clone())
}

/// `$time_iso8601` now.
pub fn iso8601() -> String {
    with_cached(|c| c.iso.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_as_nginx() {
        let t = Local {
            year: 2026,
            month: 11,
            day: 3,
            hour: 9,
            min: 8,
            sec: 7,
            offset: -(5 * 3600 + 30 * 60),
        };
        assert_eq!(format_local(&t), "03/Dec/2026:09:08:07 -0530");
        assert_eq!(format_iso(&t), "2026-12-03T09:08:07-05:30");
        let utc = Local { offset: 0, ..t };
        assert_eq!(format_local(&utc), "03/Dec/2026:09:08:07 +0000");
        assert_eq!(format_iso(&utc), "2026-12-03T09:08:07+00:00");
    }
}
