//! [`OutboxReceipt`]: how an appender learns that its record is durable, from a thread or
//! from an async task, without the store depending on an async runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::StoreError;

/// An outbox append on its way to the disk. It resolves to the record's sequence number
/// once the record is durable, or to why it was not committed: await it from async code, or
/// call [`OutboxReceipt::wait`] from a thread. Dropping it does not withdraw the record: it
/// is committed all the same, only nobody hears about it.
#[must_use = "the record is durable only when the receipt resolves"]
#[derive(Debug)]
pub struct OutboxReceipt(Inner);

#[derive(Debug)]
enum Inner {
    /// Refused before it was queued (or already resolved and taken).
    Ready(Option<Result<u64, StoreError>>),
    Pending(Arc<Completion>),
}

impl OutboxReceipt {
    /// A receipt for a record refused before it was queued.
    pub(crate) fn refused(e: StoreError) -> Self {
        Self(Inner::Ready(Some(Err(e))))
    }

    /// A receipt and the handle that resolves it.
    pub(crate) fn pending() -> (Self, Arc<Completion>) {
        let completion = Arc::new(Completion::default());
        (Self(Inner::Pending(Arc::clone(&completion))), completion)
    }

    /// Blocks the calling thread until the record is durable (or failed). Do not call it
    /// on an async runtime's worker thread: await the receipt there instead.
    pub fn wait(self) -> Result<u64, StoreError> {
        match self.0 {
            Inner::Ready(result) => result.unwrap_or_else(resolved_twice),
            Inner::Pending(completion) => completion.wait(),
        }
    }
}

impl Future for OutboxReceipt {
    type Output = Result<u64, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            Inner::Ready(result) => Poll::Ready(result.take().unwrap_or_else(resolved_twice)),
            Inner::Pending(completion) => completion.poll(cx),
        }
    }
}

fn resolved_twice() -> Result<u64, StoreError> {
    Err(StoreError::Invalid {
        what: "outbox receipt",
        value: String::new(),
        reason: "it was polled again after it resolved",
    })
}

/// The committer's end of a receipt.
#[derive(Debug, Default)]
pub(crate) struct Completion {
    slot: Mutex<Slot>,
    /// A thread in [`OutboxReceipt::wait`] waits here.
    ready: Condvar,
}

#[derive(Debug, Default)]
enum Slot {
    /// Not resolved; the waker of the task that polled last.
    #[default]
    Waiting,
    Polled(Waker),
    Done(Result<u64, StoreError>),
    Taken,
}

impl Completion {
    /// Resolves the receipt and wakes whoever waits on it.
    pub(crate) fn complete(&self, result: Result<u64, StoreError>) {
        let previous = std::mem::replace(
            &mut *self.slot.lock().unwrap_or_else(PoisonError::into_inner),
            Slot::Done(result),
        );
        self.ready.notify_one();
        if let Slot::Polled(waker) = previous {
            waker.wake();
        }
    }

    fn wait(&self) -> Result<u64, StoreError> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match std::mem::replace(&mut *slot, Slot::Taken) {
                Slot::Done(result) => return result,
                Slot::Taken => return resolved_twice(),
                waiting => {
                    *slot = waiting;
                    slot = self
                        .ready
                        .wait(slot)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<Result<u64, StoreError>> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut *slot, Slot::Taken) {
            Slot::Done(result) => Poll::Ready(result),
            Slot::Taken => Poll::Ready(resolved_twice()),
            Slot::Polled(waker) if waker.will_wake(cx.waker()) => {
                *slot = Slot::Polled(waker);
                Poll::Pending
            }
            Slot::Waiting | Slot::Polled(_) => {
                *slot = Slot::Polled(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Count(Mutex<u32>);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            *self.0.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        }
    }

    #[test]
    fn a_receipt_resolves_once_for_a_thread_or_a_task() {
        let (receipt, completion) = OutboxReceipt::pending();
        let waiter = std::thread::spawn(move || receipt.wait());
        completion.complete(Ok(7));
        assert_eq!(waiter.join().ok().and_then(Result::ok), Some(7));

        let (mut receipt, completion) = OutboxReceipt::pending();
        let count = Arc::new(Count(Mutex::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut receipt).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut receipt).poll(&mut cx).is_pending());
        completion.complete(Ok(8));
        assert_eq!(*count.0.lock().unwrap_or_else(PoisonError::into_inner), 1);
        assert!(matches!(
            Pin::new(&mut receipt).poll(&mut cx),
            Poll::Ready(Ok(8))
        ));
        assert!(matches!(
            Pin::new(&mut receipt).poll(&mut cx),
            Poll::Ready(Err(StoreError::Invalid { .. }))
        ));
    }
}
