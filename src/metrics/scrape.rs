//! Scrapes whose cost does not grow with their number.
//!
//! Rendering every family in the text format is the one costly part of a scrape (tens of
//! kilobytes, hundreds of microseconds), and `/metrics` may be open to anyone. So at most
//! one rendering runs at a time, the next starts no sooner than [`GAP`] after the last one
//! started, and every scrape that arrived before a rendering started gets that rendering's
//! text. However many scrape, the instance renders at most 1 / [`GAP`] times a second.
//!
//! No scrape is answered from before it arrived: it waits for a rendering that started
//! after it, so whatever happened before a scrape is in its answer (tests rely on that: a
//! counter read after an action includes the action). A scrape waits at most [`GAP`] plus
//! one rendering, nothing to a scraper that comes every few seconds.

use std::time::Duration;

use hyper::body::Bytes;
use tokio::sync::Mutex;
use tokio::time::{Instant, sleep_until};

/// The least time between the starts of two renderings.
pub const GAP: Duration = Duration::from_millis(50);

#[derive(Default)]
pub struct Scrapes {
    /// The last rendering; the lock is held while the next one waits for its turn and
    /// runs, so scrapes queue behind it in order and find it done.
    last: Mutex<Option<Rendered>>,
}

struct Rendered {
    started: Instant,
    text: Bytes,
}

impl Scrapes {
    /// The text of a rendering that started after this call did: the last one if it did,
    /// else a new one from `render`, once its turn comes.
    pub async fn text(
        &self,
        render: impl FnOnce() -> Result<String, String>,
    ) -> Result<Bytes, String> {
        let arrived = Instant::now();
        let mut last = self.last.lock().await;
        if let Some(done) = last.as_ref() {
            // Strictly after: one that started as this call arrived may have missed what
            // had just happened.
            if done.started > arrived {
                return Ok(done.text.clone());
            }
            sleep_until(done.started + GAP).await;
        }
        let started = Instant::now();
        let text = Bytes::from(render()?);
        *last = Some(Rendered {
            started,
            text: text.clone(),
        });
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Renders the number of renderings so far, counting this one.
    fn counting(renders: &AtomicUsize) -> impl FnOnce() -> Result<String, String> + '_ {
        move || Ok((renders.fetch_add(1, Ordering::SeqCst) + 1).to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn a_scrape_after_another_gets_a_rendering_of_its_own_after_the_gap() {
        let scrapes = Scrapes::default();
        let renders = AtomicUsize::new(0);
        let first = Instant::now();
        assert_eq!(scrapes.text(counting(&renders)).await.unwrap(), "1");
        // Arrived after the first rendering started: that one may miss what came since.
        assert_eq!(scrapes.text(counting(&renders)).await.unwrap(), "2");
        assert!(
            Instant::now() >= first + GAP,
            "the second waited for the gap"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn scrapes_waiting_for_their_turn_share_one_rendering() {
        let scrapes = Arc::new(Scrapes::default());
        let renders = Arc::new(AtomicUsize::new(0));
        assert_eq!(scrapes.text(counting(&renders)).await.unwrap(), "1");
        // Twenty arrive together, after the first: one rendering answers them all.
        let waiting: Vec<_> = (0..20)
            .map(|_| {
                let (scrapes, renders) = (Arc::clone(&scrapes), Arc::clone(&renders));
                tokio::spawn(async move { scrapes.text(counting(&renders)).await })
            })
            .collect();
        for scrape in waiting {
            assert_eq!(scrape.await.unwrap().unwrap(), "2");
        }
        assert_eq!(renders.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_rendering_is_not_kept() {
        let scrapes = Scrapes::default();
        let failed = scrapes.text(|| Err("no".to_owned())).await;
        assert_eq!(failed.unwrap_err(), "no");
        let renders = AtomicUsize::new(0);
        assert_eq!(scrapes.text(counting(&renders)).await.unwrap(), "1");
    }
}
