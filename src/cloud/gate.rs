//! The IAM write budget: when the account's IAM calls are scarce (IAM
//! throttles writes per account), ephemera spends them by urgency instead
//! of letting IAM refuse them at random. A revocation goes before any
//! deletion, and a deletion before any provisioning: in a burst of ended
//! workloads every role's sessions are denied first, then the roles go,
//! and new workloads wait.
//!
//! A token bucket (`rate` writes a second, up to a second's worth saved),
//! served by one task in urgency order, first come first served within one.

use std::{collections::VecDeque, time::Duration};

use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

/// What a mutating IAM call is for, most urgent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Urgency {
    /// Denying every session of an ended workload's role.
    Revoke = 0,
    /// Keeping room for the next revocation (a revocation set's old versions).
    Ready = 1,
    /// Deleting a revoked role and its policies.
    Delete = 2,
    /// Making or updating a role.
    Provision = 3,
}

const LEVELS: usize = 4;

/// Admits mutating IAM calls at most `rate` a second, most urgent first.
#[derive(Clone, Debug)]
pub struct Gate {
    requests: mpsc::UnboundedSender<(Urgency, oneshot::Sender<()>)>,
}

impl Gate {
    /// A gate of `rate` writes a second (bursts up to `rate`). Spawns its
    /// dispatcher on the current Tokio runtime; it ends with the last clone.
    #[must_use]
    pub fn new(rate: f64) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(rate.max(0.001), rx));
        Self { requests }
    }

    /// Waits until a call of this urgency may go.
    pub async fn admit(&self, urgency: Urgency) {
        let (tx, rx) = oneshot::channel();
        if self.requests.send((urgency, tx)).is_ok() {
            // (The dispatcher gone: the runtime is shutting down; go.)
            let _ = rx.await;
        }
    }
}

async fn dispatch(rate: f64, mut rx: mpsc::UnboundedReceiver<(Urgency, oneshot::Sender<()>)>) {
    let burst = rate.max(1.0);
    let mut tokens = burst;
    let mut last = Instant::now();
    let mut queues: [VecDeque<oneshot::Sender<()>>; LEVELS] = Default::default();
    loop {
        while let Ok((urgency, tx)) = rx.try_recv() {
            queues[urgency as usize].push_back(tx);
        }
        // Waiters that gave up (their call's future was dropped) take nothing.
        for queue in &mut queues {
            queue.retain(|tx| !tx.is_closed());
        }
        let now = Instant::now();
        tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(burst);
        last = now;
        if queues.iter().all(VecDeque::is_empty) {
            match rx.recv().await {
                Some((urgency, tx)) => queues[urgency as usize].push_back(tx),
                None => return,
            }
            continue;
        }
        if tokens >= 1.0 {
            if let Some(tx) = queues.iter_mut().find_map(VecDeque::pop_front) {
                tokens -= 1.0;
                let _ = tx.send(());
            }
            continue;
        }
        let wait = Duration::from_secs_f64((1.0 - tokens) / rate);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            request = rx.recv() => match request {
                Some((urgency, tx)) => queues[urgency as usize].push_back(tx),
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn scarce_calls_go_to_revocations_first_and_keep_the_rate() {
        let gate = Gate::new(10.0);
        // The burst allowance first: ten calls at once.
        for _ in 0..10 {
            gate.admit(Urgency::Provision).await;
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let mut tasks = Vec::new();
        // Provisioning asks first, then deletions, then revocations.
        for (i, urgency) in
            [Urgency::Provision, Urgency::Provision, Urgency::Delete, Urgency::Delete, Urgency::Revoke, Urgency::Revoke]
                .into_iter()
                .enumerate()
        {
            let (gate, order) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                gate.admit(urgency).await;
                order.lock().unwrap().push((urgency, i, start.elapsed()));
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let urgencies: Vec<Urgency> = order.iter().map(|(u, _, _)| *u).collect();
        assert_eq!(
            urgencies,
            [
                Urgency::Revoke,
                Urgency::Revoke,
                Urgency::Delete,
                Urgency::Delete,
                Urgency::Provision,
                Urgency::Provision
            ]
        );
        // Within one urgency, first come first served.
        assert!(order[0].1 < order[1].1 && order[4].1 < order[5].1);
        // Ten a second: the sixth call goes about 0.6 s after the bucket ran dry.
        let last = order.last().unwrap().2;
        assert!((Duration::from_millis(550)..Duration::from_millis(700)).contains(&last), "{last:?}");
    }
}
