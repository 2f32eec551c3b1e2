//! A linearizability checker for histories of the HA key-value store, and a recorder for them.
//!
//! Tests of an HA backend under faults record what each client asked of the store and what it
//! got back ([`History`]), then ask [`check`] whether some single order of the operations, one
//! at a time, explains every answer while respecting real time: an operation that returned
//! before another was called comes first. If no such order exists the store was not
//! linearizable, and [`check`] says for which key, with that key's operations ([`Violation`]).
//!
//! # The model
//!
//! Each key holds a byte string or nothing, as the HA store's keys do:
//!
//! - `Put` sets the value and answers [`Outcome::Done`]; `Delete` removes it and answers `Done`;
//! - `Get` answers [`Outcome::Value`] with the value it saw (`None` for a missing key);
//! - `Increment` treats the value as a counter, as the store does: the decimal text of a `u64`
//!   (surrounding whitespace allowed; a missing key counts as 0), stores the next number as
//!   decimal text and answers [`Outcome::Counter`] with it. On a value that is not such a number,
//!   or on overflow, the store refuses the increment, so such an increment can only be `Failed`.
//!
//! Two more outcomes say what a client knows when it got no answer:
//!
//! - [`Outcome::Failed`]: the store said the operation was not applied (a refused fenced write,
//!   an `Unavailable` before sending). It is left out of the check: it had no effect.
//! - [`Outcome::Unknown`]: no answer (a timeout, a lost connection, a killed client). The
//!   operation may have taken effect, at any instant after its call, or never. It is checked as
//!   an operation that returns after everything else and whose answer anything matches: an order
//!   that leaves it out is the same as one that puts it last, where nothing observes it. An
//!   unknown `Get` has no effect and is left out too.
//!
//! Instants are nanoseconds on one monotonic clock. `ret` is `None` exactly when the outcome is
//! `Unknown`. Two operations where one's call and the other's return fall on the same instant are
//! taken as concurrent (the checker errs towards passing rather than inventing an order).
//!
//! # The algorithm, and why it is ours
//!
//! Keys are independent objects, and linearizability is *local* (Herlihy and Wing): a history is
//! linearizable if and only if each key's sub-history is. So each key is checked alone, which
//! keeps every search small (P-compositionality, as in Porcupine).
//!
//! A key's sub-history is checked with the Wing–Gong search as improved by Lowe and used by
//! Porcupine: the call and return events sorted by time form a doubly linked list. The search
//! walks it from the front; at a call it tries to linearize that operation next (apply it to the
//! model; a `Get` or `Increment` must get its recorded answer), and if that works it lifts the
//! operation's call and return out of the list and starts again from the front. Reaching a
//! return means the operation returning there must already have been linearized: the search
//! backtracks, restoring the last lifted operation, and tries the next call after it. The list
//! being empty means every operation is linearized. A cache of the (set of linearized operations,
//! model state) pairs already reached prunes the search: the same pair always leads to the same
//! result, which is what turns an exponential search into one fast enough for long histories.
//! The set is a bitset; model states are values interned to small integers.
//!
//! Unknown operations stay pending to the end, so each doubles the orders to consider. Three
//! reductions, each sound (it only removes orders that fail, or that a kept order matches), keep
//! that in check; a test compares the checker with an exhaustive search on small histories:
//!
//! - an unknown write nothing can observe is left out: no read saw its value, and no increment
//!   could count on from it (its value is no number, or the key has no increments);
//! - unknown operations with the same effect (all unknown increments; unknown deletes; unknown
//!   puts of one value) are interchangeable, so they are linearized in call order only;
//! - the search gives up on an order at once when a remaining read needs a value that is not
//!   the current one and that no remaining operation can write any more.
//!
//! The issue suggested `stateright`'s `LinearizabilityTester` (0.31.0). It can express failed
//! operations (leave them out) and unknown ones (left in flight, one thread id each), but its
//! search has no cache: in a debug build a 40-operation single-key register history with 8
//! clients took 1.2 s when valid and had not finished after 120 s when one read was wrong, where
//! thousands of operations are needed. It also brings 39 crates (a web server for its explorer,
//! `rand`, `serde_json`). This module is some 450 lines of std-only code instead. Figures in a
//! debug build, 8 clients, 1 in 40 operations unknown: 2,000 operations on 20 keys check in
//! under 0.1 s, valid or not; 3,000 on a single key in 0.3 s when valid, and 3 s to find a stale
//! read in their middle. Without the cache the 500-operation single-key case did not finish in
//! 5 minutes; without the three reductions, a failing one took 116 s.
//!
//! # What a violation tells
//!
//! [`Violation`] names the key, holds all of its operations (failed ones too, marked, since a
//! read of a failed write's value is a common cause) sorted by call, and the longest order of
//! them the search could build: the first operation after it is usually where to look. A
//! malformed history (a return before its call, `ret` present for an unknown outcome or missing
//! for a known one, an answer of the wrong kind) is reported as a violation too, never a panic.
//! The longest order stops short where the search gave up early. A read of a value that no
//! operation of the key wrote (failed ones aside) is reported as such, naming the read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// An operation on the HA key-value store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// Set `key` to `value`.
    Put { key: String, value: Vec<u8> },
    /// Remove `key`.
    Delete { key: String },
    /// Read `key`.
    Get { key: String },
    /// Add one to the counter stored at `key` as decimal text (missing counts as 0).
    Increment { key: String },
}

impl Op {
    /// The key the operation works on.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } | Op::Increment { key } => key,
        }
    }
}

/// What a client got back for an operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A `Put` or `Delete` was applied.
    Done,
    /// A `Get` saw this value (`None`: the key was missing).
    Value(Option<Vec<u8>>),
    /// An `Increment` was applied and the counter's new value is this.
    Counter(u64),
    /// Definitely not applied: left out of the check.
    Failed,
    /// No answer: may or may not have been applied, at any time after the call.
    Unknown,
}

/// One operation of a history: who called it, when, and what came back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Operation {
    /// The client that called it (for reports only: real-time order comes from the instants).
    pub client: u64,
    /// When it was called, in nanoseconds on the history's clock.
    pub call: u64,
    /// When it returned; `None` exactly when the outcome is [`Outcome::Unknown`].
    pub ret: Option<u64>,
    /// The operation.
    pub op: Op,
    /// What came back.
    pub outcome: Outcome,
}

/// Why a key's sub-history was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// No order of the operations explains the answers. `longest` is the longest order the
    /// search built (indices into [`Violation::operations`]).
    NotLinearizable { longest: Vec<usize> },
    /// `operation` (an index into [`Violation::operations`]) read a value that no operation of
    /// the key that may have been applied wrote: no order can explain it.
    Unwritten { operation: usize },
    /// The record itself is inconsistent: `operation` (an index into
    /// [`Violation::operations`]) has the `problem` described.
    Malformed { operation: usize, problem: &'static str },
}

/// A key whose sub-history is not linearizable (or not well formed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The key.
    pub key: String,
    /// All of the key's operations, failed ones included, sorted by call.
    pub operations: Vec<Operation>,
    /// What is wrong.
    pub reason: Reason,
}

impl std::error::Error for Violation {}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            Reason::NotLinearizable { longest } => {
                write!(
                    f,
                    "the history of key {:?} is not linearizable; the longest order found is [",
                    self.key
                )?;
                for (n, index) in longest.iter().enumerate() {
                    write!(f, "{}#{index}", if n == 0 { "" } else { ", " })?;
                }
                writeln!(f, "] ({} of {} operations)", longest.len(), self.operations.len())?;
            }
            Reason::Unwritten { operation } => {
                writeln!(
                    f,
                    "the history of key {:?} is not linearizable: operation #{operation} read a value that \
                     no operation of the key wrote (failed ones do not count)",
                    self.key
                )?;
            }
            Reason::Malformed { operation, problem } => {
                writeln!(
                    f,
                    "the history of key {:?} is malformed: operation #{operation} {problem}",
                    self.key
                )?;
            }
        }
        for (index, operation) in self.operations.iter().enumerate() {
            writeln!(f, "  #{index:<3} {operation}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ret = match self.ret {
            Some(ret) => ret.to_string(),
            None => "?".to_string(),
        };
        write!(f, "client {:<3} [{:>12} .. {:>12}] ", self.client, self.call, ret)?;
        match &self.op {
            Op::Put { value, .. } => write!(f, "put {}", Bytes(value))?,
            Op::Delete { .. } => write!(f, "delete")?,
            Op::Get { .. } => write!(f, "get")?,
            Op::Increment { .. } => write!(f, "increment")?,
        }
        match &self.outcome {
            Outcome::Done => write!(f, " -> done"),
            Outcome::Value(Some(value)) => write!(f, " -> {}", Bytes(value)),
            Outcome::Value(None) => write!(f, " -> missing"),
            Outcome::Counter(n) => write!(f, " -> {n}"),
            Outcome::Failed => write!(f, " -> failed (not applied, ignored)"),
            Outcome::Unknown => write!(f, " -> unknown"),
        }
    }
}

/// Bytes shown as a quoted string when they are UTF-8, else in hex.
struct Bytes<'a>(&'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(self.0) {
            Ok(text) => write!(f, "{text:?}"),
            Err(_) => {
                write!(f, "0x")?;
                self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
            }
        }
    }
}

/// Checks that `history` is linearizable for the key-value model of the module documentation.
/// Returns the first offending key (in key order) otherwise.
pub fn check(history: &[Operation]) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for operation in history {
        by_key.entry(operation.op.key()).or_default().push(operation);
    }
    for (key, mut operations) in by_key {
        operations.sort_by_key(|operation| (operation.call, operation.ret.is_none(), operation.ret));
        let violation = |reason| Violation {
            key: key.to_string(),
            operations: operations.iter().map(|&operation| operation.clone()).collect(),
            reason,
        };
        if let Some((operation, problem)) = operations
            .iter()
            .enumerate()
            .find_map(|(index, op)| malformed(op).map(|problem| (index, problem)))
        {
            return Err(violation(Reason::Malformed { operation, problem }));
        }
        check_key(&operations).map_err(violation)?;
    }
    Ok(())
}

/// What is wrong with the record of one operation, if anything.
fn malformed(operation: &Operation) -> Option<&'static str> {
    match (operation.ret, &operation.outcome) {
        (None, Outcome::Unknown) => return None,
        (None, _) => return Some("has no return instant but a known outcome"),
        (Some(_), Outcome::Unknown) => return Some("has a return instant but an unknown outcome"),
        (Some(ret), _) if ret < operation.call => return Some("returned before it was called"),
        _ => {}
    }
    match (&operation.op, &operation.outcome) {
        (_, Outcome::Failed)
        | (Op::Put { .. } | Op::Delete { .. }, Outcome::Done)
        | (Op::Get { .. }, Outcome::Value(_))
        | (Op::Increment { .. }, Outcome::Counter(_)) => None,
        _ => Some("has an outcome of the wrong kind for its operation"),
    }
}

/// An operation as the search applies it: values interned to state ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Step {
    /// Sets the state (put: the value's id; delete: [`MISSING`]).
    Set(u32),
    /// Must see this state and leaves it.
    Read(u32),
    /// Must find a counter one below `n` and leaves the state `id` (the decimal text of `n`).
    Count { n: u64, id: u32 },
    /// An increment with no answer: counts up if it can, else changes nothing.
    CountAny,
}

/// The state id of a missing key.
const MISSING: u32 = 0;

/// Values seen by one key's search, each given a small id, with its counter reading.
struct Interner {
    ids: HashMap<Vec<u8>, u32>,
    /// The counter reading of each id (`None`: not a decimal `u64`), `MISSING` first.
    counters: Vec<Option<u64>>,
}

impl Interner {
    fn new() -> Self {
        Interner { ids: HashMap::new(), counters: vec![Some(0)] }
    }

    fn intern(&mut self, value: &[u8]) -> u32 {
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        let id = u32::try_from(self.counters.len()).unwrap_or(u32::MAX);
        let counter = std::str::from_utf8(value).ok().and_then(|text| text.trim().parse::<u64>().ok());
        self.counters.push(counter);
        self.ids.insert(value.to_vec(), id);
        id
    }

    fn counter(&self, id: u32) -> Option<u64> {
        self.counters.get(id as usize).copied().flatten()
    }

    /// Applies `step` to `state`: the new state, or `None` if the step's answer is impossible.
    fn apply(&mut self, step: Step, state: u32) -> Option<u32> {
        match step {
            Step::Set(id) => Some(id),
            Step::Read(id) => (id == state).then_some(state),
            Step::Count { n, id } => {
                (self.counter(state).and_then(|current| current.checked_add(1)) == Some(n)).then_some(id)
            }
            Step::CountAny => match self.counter(state).and_then(|current| current.checked_add(1)) {
                Some(next) => Some(self.intern(next.to_string().as_bytes())),
                None => Some(state),
            },
        }
    }
}

/// No node: the end of the event list.
const NIL: usize = usize::MAX;

/// Checks one key's well-formed operations, sorted by call. Indices in the reason refer to
/// `operations`.
fn check_key(operations: &[&Operation]) -> Result<(), Reason> {
    let mut interner = Interner::new();
    // Each operation that can have an effect, with its step and whether it is unknown; failed
    // operations and unknown reads have none and are left out.
    let mut candidates: Vec<(usize, Step, bool)> = Vec::new();
    for (index, operation) in operations.iter().enumerate() {
        let step = match (&operation.op, &operation.outcome) {
            (_, Outcome::Failed) | (Op::Get { .. }, Outcome::Unknown) => continue,
            (Op::Put { value, .. }, _) => Step::Set(interner.intern(value)),
            (Op::Delete { .. }, _) => Step::Set(MISSING),
            (Op::Get { .. }, Outcome::Value(None)) => Step::Read(MISSING),
            (Op::Get { .. }, Outcome::Value(Some(value))) => Step::Read(interner.intern(value)),
            (Op::Increment { .. }, Outcome::Counter(n)) => {
                Step::Count { n: *n, id: interner.intern(n.to_string().as_bytes()) }
            }
            (Op::Increment { .. }, _) => Step::CountAny,
            // Excluded by `malformed`; a step that never applies would be the safe answer anyway.
            (Op::Get { .. }, _) => Step::Read(u32::MAX),
        };
        candidates.push((index, step, operation.outcome == Outcome::Unknown));
    }
    // An unknown write that nothing can observe is left out: no read saw its value, and no
    // increment could count on from it. Any order that includes it stays valid without it (what
    // came after it up to the next write saw its value: no read did, and an increment cannot
    // have counted from a value that is no number), and leaving these out keeps the search
    // from trying both ways for each.
    let read: HashSet<u32> = candidates
        .iter()
        .filter_map(|&(_, step, _)| if let Step::Read(id) = step { Some(id) } else { None })
        .collect();
    let increments =
        candidates.iter().any(|&(_, step, _)| matches!(step, Step::Count { .. } | Step::CountAny));
    candidates.retain(|&(_, step, unknown)| match step {
        Step::Set(id) if unknown => read.contains(&id) || (increments && interner.counter(id).is_some()),
        _ => true,
    });
    // Unknown operations with the same step are interchangeable (their answers are free and
    // their only bound is the call), so the search linearizes them in call order only: each
    // waits for the previous one of its kind. This turns 2^k subsets of k unknown increments
    // into k + 1. (`operations` is sorted by call.)
    let mut last_of_kind: HashMap<Step, usize> = HashMap::new();
    let mut checked: Vec<(usize, Step, Option<usize>)> = Vec::with_capacity(candidates.len());
    for (i, &(index, step, unknown)) in candidates.iter().enumerate() {
        let after = if unknown { last_of_kind.insert(step, i) } else { None };
        checked.push((index, step, after));
    }
    let n = checked.len();

    // Node 2i is the call of checked operation i, node 2i+1 its return; node 2n is the head.
    let head = 2 * n;
    let mut events: Vec<(bool, u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, &(index, _, _)) in checked.iter().enumerate() {
        let operation = operations[index];
        // Calls sort before returns at the same instant: such operations count as concurrent.
        events.push((false, operation.call, false, 2 * i));
        events.push((operation.ret.is_none(), operation.ret.unwrap_or(0), true, 2 * i + 1));
    }
    events.sort_unstable();
    let mut next = vec![NIL; 2 * n + 1];
    let mut prev = vec![NIL; 2 * n + 1];
    let mut last = head;
    for &(_, _, _, node) in &events {
        next[last] = node;
        prev[node] = last;
        last = node;
    }

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, u32)> = HashSet::new();
    let mut needs = Needs::new(checked.iter().map(|c| c.1), &interner);
    // The call nodes lifted so far, each with the state before it.
    let mut stack: Vec<(usize, u32)> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut state = MISSING;
    if needs.dead(state) {
        let unwritten = checked.iter().find_map(|&(index, step, _)| match step {
            Step::Read(id) if id != state && needs.stuck(id as usize) => Some(index),
            _ => None,
        });
        return Err(match unwritten {
            Some(operation) => Reason::Unwritten { operation },
            None => Reason::NotLinearizable { longest },
        });
    }
    let mut entry = next[head];
    while next[head] != NIL {
        if entry == NIL {
            // Cannot happen (the list always ends with a return); answer safely anyway.
            return Err(Reason::NotLinearizable { longest });
        }
        let i = entry / 2;
        let Some(&(_, step, after)) = checked.get(i) else { return Err(Reason::NotLinearizable { longest }) };
        if entry.is_multiple_of(2) {
            let waits = after.is_some_and(|j| !is_set(&linearized, j));
            let applied = if waits { None } else { interner.apply(step, state) };
            if let Some(new_state) = applied {
                flip(&mut linearized, i);
                if cache.insert((linearized.clone(), new_state)) {
                    needs.linearize(step);
                    if !needs.dead(new_state) {
                        stack.push((entry, state));
                        state = new_state;
                        lift(&mut next, &mut prev, entry);
                        if stack.len() > longest.len() {
                            longest = stack
                                .iter()
                                .filter_map(|&(node, _)| checked.get(node / 2))
                                .map(|c| c.0)
                                .collect();
                        }
                        entry = next[head];
                        continue;
                    }
                    needs.undo(step);
                }
                flip(&mut linearized, i);
            }
            entry = next[entry];
        } else {
            // The operation returning here was not linearized yet: undo the last choice.
            let Some((call, before)) = stack.pop() else { return Err(Reason::NotLinearizable { longest }) };
            let j = call / 2;
            flip(&mut linearized, j);
            if let Some(&(_, step, _)) = checked.get(j) {
                needs.undo(step);
            }
            state = before;
            unlift(&mut next, &mut prev, call);
            entry = next[call];
        }
    }
    Ok(())
}

/// What the operations not yet linearized need and can still write, per value id. A read of a
/// value that is not the current state, and that no remaining operation can write, can never
/// be explained: the search gives up on such an order at once instead of at that read's return
/// (a sound prune: it only cuts orders that must fail).
struct Needs {
    /// Remaining reads of each value id.
    reads: Vec<u32>,
    /// Remaining writers of each value id (puts, deletes, increments answering it; "many" for
    /// every number when an unknown increment exists, which may write any of them).
    writers: Vec<u32>,
    /// How many ids are stuck (remaining reads, no remaining writer), and the sum of their ids
    /// (when one is stuck, which one).
    stuck: usize,
    stuck_sum: u64,
}

impl Needs {
    fn new(steps: impl Iterator<Item = Step> + Clone, interner: &Interner) -> Self {
        let ids = interner.counters.len();
        let mut needs = Needs { reads: vec![0; ids], writers: vec![0; ids], stuck: 0, stuck_sum: 0 };
        if steps.clone().any(|step| matches!(step, Step::CountAny)) {
            for (writers, counter) in needs.writers.iter_mut().zip(&interner.counters) {
                if counter.is_some() {
                    *writers = u32::MAX / 2;
                }
            }
        }
        steps.for_each(|step| needs.undo(step));
        needs
    }

    fn stuck(&self, id: usize) -> bool {
        self.reads.get(id).is_some_and(|&r| r > 0) && self.writers.get(id).is_some_and(|&w| w == 0)
    }

    /// Adds `delta` (1 or -1) to the reads or writers of the id `step` reads or writes.
    fn count(&mut self, step: Step, delta: i32) {
        let (id, read) = match step {
            Step::Read(id) => (id as usize, true),
            Step::Set(id) | Step::Count { id, .. } => (id as usize, false),
            Step::CountAny => return,
        };
        let was = self.stuck(id);
        let counts = if read { &mut self.reads } else { &mut self.writers };
        if let Some(slot) = counts.get_mut(id) {
            *slot = slot.saturating_add_signed(delta);
        }
        match (was, self.stuck(id)) {
            (false, true) => {
                self.stuck += 1;
                self.stuck_sum = self.stuck_sum.wrapping_add(id as u64);
            }
            (true, false) => {
                self.stuck = self.stuck.saturating_sub(1);
                self.stuck_sum = self.stuck_sum.wrapping_sub(id as u64);
            }
            _ => {}
        }
    }

    /// The operation with `step` was linearized: it no longer needs or writes anything.
    fn linearize(&mut self, step: Step) {
        self.count(step, -1);
    }

    /// The operation with `step` is back among the remaining ones.
    fn undo(&mut self, step: Step) {
        self.count(step, 1);
    }

    /// Whether, in `state`, some remaining read can no longer be explained.
    fn dead(&self, state: u32) -> bool {
        self.stuck > 1 || (self.stuck == 1 && self.stuck_sum != u64::from(state))
    }
}

/// Flips bit `i` of `bits`.
fn flip(bits: &mut [u64], i: usize) {
    if let Some(word) = bits.get_mut(i / 64) {
        *word ^= 1u64 << (i % 64);
    }
}

/// Whether bit `i` of `bits` is set.
fn is_set(bits: &[u64], i: usize) -> bool {
    bits.get(i / 64).is_some_and(|word| word & (1u64 << (i % 64)) != 0)
}

/// Takes the call node `call` and its return node `call + 1` out of the list.
fn lift(next: &mut [usize], prev: &mut [usize], call: usize) {
    for node in [call, call + 1] {
        let (p, n) = (prev[node], next[node]);
        next[p] = n;
        if n != NIL {
            prev[n] = p;
        }
    }
}

/// Puts back what [`lift`] took out, in the reverse order.
fn unlift(next: &mut [usize], prev: &mut [usize], call: usize) {
    for node in [call + 1, call] {
        let (p, n) = (prev[node], next[node]);
        next[p] = node;
        if n != NIL {
            prev[n] = node;
        }
    }
}

/// A recorder of a history, shared by the clients of a test (clones share one record).
///
/// Instants are nanoseconds since the history was created, on [`Instant`]'s monotonic clock.
#[derive(Debug, Clone)]
pub struct History {
    origin: Instant,
    operations: Arc<Mutex<Vec<Operation>>>,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> Self {
        History { origin: Instant::now(), operations: Arc::new(Mutex::new(Vec::new())) }
    }

    /// Records that `client` calls `op` now. Call this just before sending the request.
    pub fn begin(&self, client: u64, op: Op) -> Pending {
        Pending { history: self.clone(), started: Some((client, self.now(), op)) }
    }

    /// The operations finished so far (including those recorded as unknown), in the order they
    /// finished.
    pub fn operations(&self) -> Vec<Operation> {
        self.lock().clone()
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Operation>> {
        self.operations.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An operation called and not yet finished. Dropping it unfinished (a cancelled future, a
/// panicking client) records it as [`Outcome::Unknown`], which is what it is.
#[derive(Debug)]
#[must_use = "finish the operation with its outcome"]
pub struct Pending {
    history: History,
    started: Option<(u64, u64, Op)>,
}

impl Pending {
    /// Records the operation's outcome, returning now (or never, for [`Outcome::Unknown`]).
    /// Call this as soon as the answer (or the error) arrives.
    pub fn finish(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        if let Some((client, call, op)) = self.started.take() {
            let ret = match outcome {
                Outcome::Unknown => None,
                _ => Some(self.history.now().max(call)),
            };
            self.history.lock().push(Operation { client, call, ret, op, outcome });
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.record(Outcome::Unknown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn put(key: &str, value: &str) -> Op {
        Op::Put { key: key.to_string(), value: value.as_bytes().to_vec() }
    }

    fn get(key: &str) -> Op {
        Op::Get { key: key.to_string() }
    }

    fn delete(key: &str) -> Op {
        Op::Delete { key: key.to_string() }
    }

    fn inc(key: &str) -> Op {
        Op::Increment { key: key.to_string() }
    }

    fn seen(value: &str) -> Outcome {
        Outcome::Value(Some(value.as_bytes().to_vec()))
    }

    /// An operation by `client` over `[call, ret]`.
    fn op(client: u64, call: u64, ret: u64, op: Op, outcome: Outcome) -> Operation {
        Operation { client, call, ret: Some(ret), op, outcome }
    }

    /// An operation by `client` called at `call` that never answered.
    fn unknown(client: u64, call: u64, op: Op) -> Operation {
        Operation { client, call, ret: None, op, outcome: Outcome::Unknown }
    }

    /// `check` must reject `history`, naming `key`.
    fn assert_violation(history: &[Operation], key: &str) -> TestResult {
        match check(history) {
            Ok(()) => Err(format!("accepted a history that is not linearizable: {history:#?}").into()),
            Err(violation) if violation.key == key => Ok(()),
            Err(violation) => Err(format!("blamed the wrong key:\n{violation}").into()),
        }
    }

    /// A sequential history whose reads see the latest writes passes.
    #[test]
    fn sequential_good_history_passes() -> TestResult {
        let history = [
            op(1, 0, 10, get("k"), Outcome::Value(None)),
            op(1, 20, 30, put("k", "a"), Outcome::Done),
            op(2, 40, 50, get("k"), seen("a")),
            op(1, 60, 70, put("k", "b"), Outcome::Done),
            op(2, 80, 90, get("k"), seen("b")),
        ];
        check(&history)?;
        Ok(())
    }

    /// A sequential history whose last read sees an overwritten value fails, and the report
    /// names the key and lists its operations.
    #[test]
    fn sequential_bad_history_fails() -> TestResult {
        let history = [
            op(1, 0, 10, put("k", "a"), Outcome::Done),
            op(1, 20, 30, put("k", "b"), Outcome::Done),
            op(2, 40, 50, get("k"), seen("a")),
        ];
        assert_violation(&history, "k")?;
        let text = check(&history).err().ok_or("accepted")?.to_string();
        for part in ["\"k\"", "put \"a\"", "put \"b\"", "get -> \"a\"", "longest order found"] {
            if !text.contains(part) {
                return Err(format!("report lacks {part:?}:\n{text}").into());
            }
        }
        Ok(())
    }

    /// Two overlapping writes may take effect in either order: reads after both that see
    /// either value pass, but reads after both that disagree with each other fail.
    #[test]
    fn concurrent_writes_either_order() -> TestResult {
        for (last, other) in [("a", "b"), ("b", "a")] {
            let history = [
                op(1, 0, 100, put("k", "a"), Outcome::Done),
                op(2, 10, 90, put("k", "b"), Outcome::Done),
                op(3, 50, 60, get("k"), seen(other)),
                op(3, 110, 120, get("k"), seen(last)),
                op(3, 130, 140, get("k"), seen(last)),
            ];
            check(&history)?;
            let flapping = [
                op(1, 0, 100, put("k", "a"), Outcome::Done),
                op(2, 10, 90, put("k", "b"), Outcome::Done),
                op(3, 110, 120, get("k"), seen(last)),
                op(3, 130, 140, get("k"), seen(other)),
            ];
            assert_violation(&flapping, "k")?;
        }
        Ok(())
    }

    /// A read that starts after a write completed and still sees the older value fails, while
    /// the same read overlapping the write passes.
    #[test]
    fn stale_read_after_completed_write_fails() -> TestResult {
        let stale = [
            op(1, 0, 10, put("k", "old"), Outcome::Done),
            op(1, 20, 30, put("k", "new"), Outcome::Done),
            op(2, 31, 40, get("k"), seen("old")),
        ];
        assert_violation(&stale, "k")?;
        let overlapping = [
            op(1, 0, 10, put("k", "old"), Outcome::Done),
            op(1, 20, 30, put("k", "new"), Outcome::Done),
            op(2, 25, 40, get("k"), seen("old")),
        ];
        check(&overlapping)?;
        Ok(())
    }

    /// A read of a value nobody wrote fails, on a key next to a fine one, and the report names
    /// that read.
    #[test]
    fn read_of_unwritten_value_fails() -> TestResult {
        let history = [
            op(1, 0, 10, put("a", "x"), Outcome::Done),
            op(2, 20, 30, get("a"), seen("x")),
            op(2, 5, 30, put("b", "y"), Outcome::Done),
            op(3, 6, 30, get("b"), seen("x")),
        ];
        assert_violation(&history, "b")?;
        match check(&history) {
            Err(Violation { reason: Reason::Unwritten { operation: 1 }, .. }) => Ok(()),
            other => Err(format!("expected operation #1 of key b to be named, got {other:?}").into()),
        }
    }

    /// A put with no answer that a later read observes passes, and so does one that nothing
    /// ever observes (reads after it still see the old value).
    #[test]
    fn unknown_put_observed_or_not_passes() -> TestResult {
        let observed = [
            op(1, 0, 10, put("k", "a"), Outcome::Done),
            unknown(2, 20, put("k", "b")),
            op(3, 30, 40, get("k"), seen("a")),
            op(3, 1_000, 1_010, get("k"), seen("b")),
            op(3, 1_020, 1_030, get("k"), seen("b")),
        ];
        check(&observed)?;
        let never = [
            op(1, 0, 10, put("k", "a"), Outcome::Done),
            unknown(2, 20, put("k", "b")),
            op(3, 30, 40, get("k"), seen("a")),
            op(3, 1_000, 1_010, get("k"), seen("a")),
        ];
        check(&never)?;
        Ok(())
    }

    /// A put with no answer cannot take effect before it was called: a read that returned
    /// before its call and saw its value fails.
    #[test]
    fn unknown_put_observed_before_its_call_fails() -> TestResult {
        let history = [op(1, 0, 10, get("k"), seen("b")), unknown(2, 20, put("k", "b"))];
        assert_violation(&history, "k")
    }

    /// An unknown put, once observed, stays in effect: it cannot be applied twice around a
    /// later write.
    #[test]
    fn unknown_put_applies_at_most_once() -> TestResult {
        let history = [
            unknown(1, 0, put("k", "a")),
            op(2, 10, 20, get("k"), seen("a")),
            op(2, 30, 40, put("k", "b"), Outcome::Done),
            op(2, 50, 60, get("k"), seen("a")),
        ];
        assert_violation(&history, "k")
    }

    /// Failed operations have no effect: a history with one otherwise passes, and a read that
    /// sees a failed put's value fails.
    #[test]
    fn failed_ops_are_ignored() -> TestResult {
        let fine = [
            op(1, 0, 10, put("k", "a"), Outcome::Done),
            op(1, 20, 30, put("k", "b"), Outcome::Failed),
            op(2, 40, 50, get("k"), seen("a")),
            op(2, 60, 70, inc("k"), Outcome::Failed),
        ];
        check(&fine)?;
        let seen_failed = [
            op(1, 0, 10, put("k", "a"), Outcome::Done),
            op(1, 20, 30, put("k", "b"), Outcome::Failed),
            op(2, 40, 50, get("k"), seen("b")),
        ];
        assert_violation(&seen_failed, "k")
    }

    /// Concurrent increments answering 1, 2, 3 in any order pass; two increments answering the
    /// same number fail.
    #[test]
    fn duplicate_increments_fail() -> TestResult {
        let fine = [
            op(1, 0, 100, inc("c"), Outcome::Counter(2)),
            op(2, 10, 90, inc("c"), Outcome::Counter(3)),
            op(3, 20, 80, inc("c"), Outcome::Counter(1)),
            op(3, 110, 120, get("c"), seen("3")),
        ];
        check(&fine)?;
        let duplicate =
            [op(1, 0, 100, inc("c"), Outcome::Counter(1)), op(2, 10, 90, inc("c"), Outcome::Counter(1))];
        assert_violation(&duplicate, "c")
    }

    /// An increment that skips a number fails when no other operation could have taken it,
    /// and passes when an increment with no answer could have.
    #[test]
    fn skipped_increment_fails_unless_explained() -> TestResult {
        let skipped =
            [op(1, 0, 10, inc("c"), Outcome::Counter(1)), op(1, 20, 30, inc("c"), Outcome::Counter(3))];
        assert_violation(&skipped, "c")?;
        let explained = [
            op(1, 0, 10, inc("c"), Outcome::Counter(1)),
            unknown(2, 12, inc("c")),
            op(1, 20, 30, inc("c"), Outcome::Counter(3)),
        ];
        check(&explained)?;
        let failed_cannot_explain = [
            op(1, 0, 10, inc("c"), Outcome::Counter(1)),
            op(2, 12, 15, inc("c"), Outcome::Failed),
            op(1, 20, 30, inc("c"), Outcome::Counter(3)),
        ];
        assert_violation(&failed_cannot_explain, "c")
    }

    /// Increments follow the store's counter rule: they continue from a put decimal number and
    /// cannot count on a value that is not one.
    #[test]
    fn increments_read_decimal_text() -> TestResult {
        let from_put = [
            op(1, 0, 10, put("c", "41"), Outcome::Done),
            op(1, 20, 30, inc("c"), Outcome::Counter(42)),
            op(1, 40, 50, get("c"), seen("42")),
        ];
        check(&from_put)?;
        let from_text =
            [op(1, 0, 10, put("c", "x"), Outcome::Done), op(1, 20, 30, inc("c"), Outcome::Counter(1))];
        assert_violation(&from_text, "c")
    }

    /// After a delete a read sees the key missing; seeing the deleted value fails, and an
    /// increment restarts from 1.
    #[test]
    fn delete_then_get_none() -> TestResult {
        let fine = [
            op(1, 0, 10, put("k", "a"), Outcome::Done),
            op(1, 20, 30, delete("k"), Outcome::Done),
            op(2, 40, 50, get("k"), Outcome::Value(None)),
            op(2, 60, 70, inc("k"), Outcome::Counter(1)),
        ];
        check(&fine)?;
        let resurrected = [
            op(1, 0, 10, put("k", "a"), Outcome::Done),
            op(1, 20, 30, delete("k"), Outcome::Done),
            op(2, 40, 50, get("k"), seen("a")),
        ];
        assert_violation(&resurrected, "k")
    }

    /// Inconsistent records are reported as malformed, not checked and not a panic.
    #[test]
    fn malformed_histories_are_reported() -> TestResult {
        let cases = [
            op(1, 10, 5, put("k", "a"), Outcome::Done),
            Operation { client: 1, call: 0, ret: None, op: put("k", "a"), outcome: Outcome::Done },
            op(1, 0, 10, put("k", "a"), Outcome::Unknown),
            op(1, 0, 10, get("k"), Outcome::Counter(1)),
        ];
        for case in cases {
            match check(std::slice::from_ref(&case)) {
                Err(Violation { reason: Reason::Malformed { operation: 0, .. }, .. }) => {}
                other => return Err(format!("{case:?} gave {other:?}").into()),
            }
        }
        Ok(())
    }

    /// The recorder, shared by threads, records every operation once with its call before its
    /// return and each client's operations in order, records an unfinished (dropped) operation as
    /// unknown, and what it records checks as linearizable when the store is a mutex-guarded map.
    #[test]
    fn history_records_across_threads() -> TestResult {
        let history = History::new();
        let store: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let threads: Vec<_> = (0..4u64)
            .map(|client| {
                let (history, store) = (history.clone(), store.clone());
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        let key = format!("k{}", i % 3);
                        if i % 2 == 0 {
                            let value = format!("{client}-{i}");
                            let pending = history.begin(client, put(&key, &value));
                            store.lock().unwrap_or_else(|p| p.into_inner()).insert(key, value.into_bytes());
                            pending.finish(Outcome::Done);
                        } else {
                            let pending = history.begin(client, get(&key));
                            let value = store.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
                            pending.finish(Outcome::Value(value));
                        }
                    }
                    drop(history.begin(client, put("k0", "lost")));
                })
            })
            .collect();
        for thread in threads {
            thread.join().map_err(|_| "client thread panicked")?;
        }
        let operations = history.operations();
        let unknown: Vec<_> = operations.iter().filter(|o| o.outcome == Outcome::Unknown).collect();
        if operations.len() != 4 * 51 || unknown.len() != 4 || unknown.iter().any(|o| o.ret.is_some()) {
            return Err(format!("recorded {} operations, {} unknown", operations.len(), unknown.len()).into());
        }
        for client in 0..4 {
            let mine: Vec<_> = operations.iter().filter(|o| o.client == client && o.ret.is_some()).collect();
            let ordered = mine.windows(2).all(|w| matches!(w, [a, b] if a.ret <= Some(b.call)));
            if !ordered || mine.iter().any(|o| o.ret < Some(o.call)) {
                return Err(format!("client {client}'s instants are out of order").into());
            }
        }
        check(&operations)?;
        Ok(())
    }

    /// A small xorshift generator, so that the random tests need no crate and repeat exactly.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// A history of `count` operations by `clients` clients on `keys` keys, made by running a
    /// linearizable store: each operation takes effect at a random instant inside its interval
    /// (an unknown one at a random instant after its call, or never; a failed one never).
    /// Keys below `keys / 4` are counters, the others hold unique values.
    fn random_history(seed: u64, count: usize, clients: u64, keys: u64) -> Vec<Operation> {
        let mut rng = XorShift(seed);
        let mut free = vec![0u64; clients as usize];
        // (operation, instant it takes effect, if ever)
        let mut planned: Vec<(Operation, Option<u64>)> = Vec::with_capacity(count);
        for i in 0..count {
            let client = rng.below(clients);
            let Some(slot) = free.get_mut(client as usize) else { continue };
            let k = rng.below(keys);
            let key = format!("key{k}");
            let op = match (k < keys / 4, rng.below(10)) {
                (_, 0) => delete(&key),
                (_, 1..=4) => get(&key),
                (true, _) => inc(&key),
                (false, _) => put(&key, &format!("v{i}")),
            };
            let call = *slot + rng.below(200);
            let effect = call + 1 + rng.below(1_000);
            let ret = effect + 1 + rng.below(1_000);
            let (outcome, ret, effect) = match rng.below(40) {
                0 => (Outcome::Failed, Some(ret), None),
                1 => {
                    let late = (rng.below(2) == 0).then(|| call + 1 + rng.below(20_000));
                    (Outcome::Unknown, None, late)
                }
                _ => (Outcome::Done, Some(ret), Some(effect)),
            };
            *slot = ret.unwrap_or(call + 3_000) + 1;
            planned.push((Operation { client, call, ret, op, outcome }, effect));
        }
        let mut order: Vec<usize> = (0..planned.len()).collect();
        order.sort_by_key(|&i| planned.get(i).and_then(|p| p.1));
        let mut store: HashMap<String, Vec<u8>> = HashMap::new();
        for i in order {
            let Some((operation, Some(_))) = planned.get_mut(i) else { continue };
            let outcome = match &operation.op {
                Op::Put { key, value } => {
                    store.insert(key.clone(), value.clone());
                    Outcome::Done
                }
                Op::Delete { key } => {
                    store.remove(key);
                    Outcome::Done
                }
                Op::Get { key } => Outcome::Value(store.get(key).cloned()),
                Op::Increment { key } => {
                    let current = store.get(key).map_or(Some(0), |v| {
                        std::str::from_utf8(v).ok().and_then(|t| t.trim().parse::<u64>().ok())
                    });
                    match current.and_then(|c| c.checked_add(1)) {
                        Some(next) => {
                            store.insert(key.clone(), next.to_string().into_bytes());
                            Outcome::Counter(next)
                        }
                        None => Outcome::Failed,
                    }
                }
            };
            if operation.outcome != Outcome::Unknown {
                operation.outcome = outcome;
            }
        }
        planned.into_iter().map(|(operation, _)| operation).collect()
    }

    /// A random valid history of 2,000 operations on 20 keys by 8 clients passes (and the time
    /// taken is printed); altering one read to a value never written makes it fail, and so does
    /// altering one read to a value that a completed later write had certainly replaced.
    #[test]
    fn random_history_passes_and_altered_fails() -> TestResult {
        let history = random_history(0x5eed_1234_abcd_0017, 2_000, 8, 20);
        let count = |f: fn(&Outcome) -> bool| history.iter().filter(|o| f(&o.outcome)).count();
        let kinds = [
            count(|o| matches!(o, Outcome::Unknown)),
            count(|o| matches!(o, Outcome::Failed)),
            count(|o| matches!(o, Outcome::Counter(_))),
            count(|o| matches!(o, Outcome::Value(None))),
        ];
        if kinds.contains(&0) {
            return Err(
                format!("generator lacks a kind (unknown, failed, counter, missing): {kinds:?}").into()
            );
        }
        let started = Instant::now();
        check(&history)?;
        println!("checked {} operations {kinds:?} in {:?}", history.len(), started.elapsed());

        let reads: Vec<usize> = (0..history.len())
            .filter(|&i| history.get(i).is_some_and(|o| matches!(o.outcome, Outcome::Value(_))))
            .collect();
        let target = *reads.get(reads.len() / 2).ok_or("no reads generated")?;
        let mut unwritten = history.clone();
        let read = unwritten.get_mut(target).ok_or("no read")?;
        read.outcome = seen("never written");
        let key = read.op.key().to_string();
        assert_violation(&unwritten, &key)?;

        // A stale value: put P completed before a completed write W was called, and W completed
        // before read R was called; R seeing P's (unique) value is not linearizable.
        let done = |o: &Operation| o.outcome == Outcome::Done;
        let stale = reads.iter().find_map(|&r| {
            let read = history.get(r)?;
            let key = read.op.key();
            history.iter().find_map(|p| match &p.op {
                Op::Put { key: pk, value } if pk == key && done(p) => {
                    let p_ret = p.ret?;
                    let overwritten = history.iter().any(|w| {
                        w.op.key() == key && done(w) && w.call > p_ret && w.ret.is_some_and(|t| t < read.call)
                    });
                    let differs = read.outcome != Outcome::Value(Some(value.clone()));
                    (overwritten && differs).then(|| (r, value.clone()))
                }
                _ => None,
            })
        });
        let (r, value) = stale.ok_or("no read with a certainly overwritten earlier put")?;
        let mut stale_history = history.clone();
        let read = stale_history.get_mut(r).ok_or("no read")?;
        read.outcome = Outcome::Value(Some(value));
        let key = read.op.key().to_string();
        assert_violation(&stale_history, &key)
    }

    /// Whether `history` (one key) has a linearization, by trying every order: no cache, no
    /// reductions, the model written out again on plain values. The reference for the test below.
    fn brute_force(history: &[Operation]) -> bool {
        fn apply(state: &Option<Vec<u8>>, operation: &Operation) -> Option<Option<Vec<u8>>> {
            let counter = |s: &Option<Vec<u8>>| match s {
                None => Some(0u64),
                Some(v) => std::str::from_utf8(v).ok().and_then(|t| t.trim().parse::<u64>().ok()),
            };
            match (&operation.op, &operation.outcome) {
                (Op::Put { value, .. }, _) => Some(Some(value.clone())),
                (Op::Delete { .. }, _) => Some(None),
                (Op::Get { .. }, Outcome::Value(v)) => (v == state).then(|| state.clone()),
                (Op::Get { .. }, _) => Some(state.clone()),
                (Op::Increment { .. }, Outcome::Counter(n)) => {
                    (counter(state).and_then(|c| c.checked_add(1)) == Some(*n))
                        .then(|| Some(n.to_string().into_bytes()))
                }
                (Op::Increment { .. }, _) => Some(match counter(state).and_then(|c| c.checked_add(1)) {
                    Some(next) => Some(next.to_string().into_bytes()),
                    None => state.clone(),
                }),
            }
        }
        fn search(remaining: &[&Operation], state: &Option<Vec<u8>>) -> bool {
            if remaining.iter().all(|o| o.ret.is_none()) {
                return true;
            }
            remaining.iter().enumerate().any(|(i, o)| {
                let blocked = remaining.iter().any(|p| p.ret.is_some_and(|ret| ret < o.call));
                !blocked
                    && apply(state, o).is_some_and(|next| {
                        let rest: Vec<&Operation> =
                            remaining.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, p)| *p).collect();
                        search(&rest, &next)
                    })
            })
        }
        let effective: Vec<&Operation> = history.iter().filter(|o| o.outcome != Outcome::Failed).collect();
        search(&effective, &None)
    }

    /// The checker, with its cache, its leaving out of unobservable unknown writes, its ordering
    /// of interchangeable unknown operations and its early give-up, agrees with trying every
    /// order, on 3,000 small random histories of one key (about half of them not linearizable),
    /// with equal instants, unknown and failed operations, and counters.
    #[test]
    fn agrees_with_brute_force() -> TestResult {
        let mut rng = XorShift(0x0dd_ba11_cafe_f00d);
        let values = ["a", "b", "1", "2"];
        let (mut good, mut bad) = (0, 0);
        for _ in 0..3_000 {
            let mut free = [0u64; 3];
            let mut history = Vec::new();
            for _ in 0..2 + rng.below(6) {
                let client = rng.below(3);
                let Some(slot) = free.get_mut(client as usize) else { continue };
                let call = *slot + rng.below(6);
                let ret = call + rng.below(8);
                let value = values.get(rng.below(4) as usize).copied().unwrap_or("a");
                let (op, answer) = match rng.below(5) {
                    0 | 1 => (put("k", value), Outcome::Done),
                    2 => (delete("k"), Outcome::Done),
                    3 => (get("k"), if rng.below(4) == 0 { Outcome::Value(None) } else { seen(value) }),
                    _ => (inc("k"), Outcome::Counter(1 + rng.below(3))),
                };
                let (outcome, ret) = match rng.below(6) {
                    0 => (Outcome::Unknown, None),
                    1 => (Outcome::Failed, Some(ret)),
                    _ => (answer, Some(ret)),
                };
                *slot = ret.unwrap_or(call + 10) + 1;
                history.push(Operation { client, call, ret, op, outcome });
            }
            let expected = brute_force(&history);
            if check(&history).is_ok() != expected {
                return Err(format!("checker disagrees (brute force: {expected}) on {history:#?}").into());
            }
            if expected {
                good += 1;
            } else {
                bad += 1;
            }
        }
        println!("{good} linearizable, {bad} not");
        if good < 500 || bad < 500 {
            return Err(format!("unbalanced sample: {good} linearizable, {bad} not").into());
        }
        Ok(())
    }

    /// Several random histories with many clients on few keys (much concurrency per key) pass.
    #[test]
    fn random_crowded_histories_pass() -> TestResult {
        for seed in 1..=5u64 {
            let history = random_history(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 600, 12, 4);
            let started = Instant::now();
            check(&history)?;
            println!("seed {seed}: checked {} operations in {:?}", history.len(), started.elapsed());
        }
        Ok(())
    }
}
