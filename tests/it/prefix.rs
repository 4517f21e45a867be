//! Shared prefixes, against a real server (tiny model) and tonic clients,
//! and in the library beside a model that shares nothing:
//! conversations that begin with the same turns prefill them once and hold
//! their KV rows once. "Once" is checked on the model-call counter and on
//! the census of the KV tensors that exist (bytes measured from the
//! tensors, against token counts the test makes with the reference
//! tokenizer), never on the server's sharing counters alone; every vector
//! against its one-shot oracle.

use std::sync::Arc;

use stateful_embedder::{
    conversation::{Conversation, ConversationOptions, MeanOver, TurnOutput},
    engine::{BatchLimits, KvBudget, TurnRequest, run_turns, run_turns_within},
    model::Model,
    pb::{self, Overflow},
};

use crate::support::{
    models,
    oracle::{F32, FP16, Tolerance, assert_close, oracle},
    server::{Census, TestServer, census},
    stream::{Talker, embedding, options, reset, turn},
    tokens::{self, Context},
};

/// The tiny model's KV bytes per token (2 layers × K,V × 2 heads × 16 × f32).
const TINY_KV_BYTES_PER_TOKEN: u64 = 512;

/// A system prompt of a few hundred tokens, then an example exchange.
fn prefix() -> Vec<(&'static str, String)> {
    let rules: String = (0..24)
        .map(|i| format!("Rule {i}: name every function for what it returns, and test case {i} first.\n"))
        .collect();
    vec![
        ("system", format!("You are a careful Rust reviewer.\n{rules}")),
        ("user", "Example: fn add(a: i32, b: i32) -> i32 { a + b }".to_string()),
        (
            "assistant",
            "It adds two numbers; name it sum and test overflow.".to_string(),
        ),
    ]
}

fn tokens_of(turns: &[(&str, String)]) -> usize {
    turns.iter().map(|(role, text)| tokens::turn(text, role).0.len()).sum()
}

impl Talker {
    /// A turn in `role` that must succeed and equal its one-shot oracle.
    async fn say_as(&mut self, role: &str, text: &str) -> pb::Embedding {
        let response = self.send(turn(role, text, role)).await;
        let mut after = self.context.clone();
        let span = after.push(text, role);
        let want = oracle(&models::tiny(), &after.ids, span, &self.options);
        let e = embedding(&response).clone();
        assert_close(&format!("{role}: {text:.40}"), &e.values, &want, F32);
        assert_eq!(e.context_tokens as usize, after.ids.len());
        self.context = after;
        e
    }
}

/// The census with the ledger equal to it.
async fn counted(
    client: &mut stateful_embedder::pb::embedder_client::EmbedderClient<tonic::transport::Channel>,
) -> Census {
    let c = census(client).await;
    assert_eq!(
        c.stats.kv_cache_bytes, c.bytes,
        "the ledger agrees with the census: {c:?}"
    );
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Fifty streams that begin with the same three turns (a system prompt and
/// an example exchange) and go on with a fourth of their own: the three are
/// prefilled once (three model calls for all fifty streams, then one per
/// fourth turn) and held once (the KV tensors that exist are those of one
/// prefix plus the fourth turns, not fifty prefixes), and every turn of
/// every stream equals its one-shot oracle. A stream whose third turn
/// differs shares the first two only.
async fn fifty_streams_prefill_and_hold_a_shared_prefix_once() {
    const STREAMS: usize = 50;
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let start = counted(&mut client).await;
    assert_eq!(start.bytes, 0);
    let prefix = prefix();
    let p = tokens_of(&prefix);
    let probe = crate::support::profile::of(&models::tiny_dir()).probe_ids.len();

    let mut talkers = Vec::new();
    let mut own = 0usize;
    for s in 0..STREAMS {
        let mut talker = Talker::open(&mut client).await;
        for (role, text) in &prefix {
            talker.say_as(role, text).await;
        }
        let fourth = format!("Stream {s}: fn f{s}(x: u64) -> u64 {{ x.pow({s}) }}");
        own += tokens::turn(&fourth, "user").0.len();
        talker.say_as("user", &fourth).await;
        talkers.push(talker);
    }
    let after = counted(&mut client).await;
    let calls = after.stats.model_calls_total - start.stats.model_calls_total;
    assert_eq!(
        calls,
        (prefix.len() + STREAMS) as u64,
        "the prefix's turns ran once, each fourth turn once"
    );
    assert_eq!(
        after.bytes,
        (p + own) as u64 * TINY_KV_BYTES_PER_TOKEN,
        "one prefix and the fourth turns are held: {after:?}"
    );
    let unshared = (STREAMS * p + own) as u64 * TINY_KV_BYTES_PER_TOKEN;
    println!(
        "{STREAMS} streams: {} KV bytes held, {unshared} without sharing ({:.1}x)",
        after.bytes,
        unshared as f64 / after.bytes as f64
    );
    let s = &after.stats;
    assert_eq!(s.shared_turns_total, ((STREAMS - 1) * prefix.len()) as u64, "{s:?}");
    assert_eq!(
        s.shared_tokens_saved_total,
        ((STREAMS - 1) * (p + prefix.len() * probe)) as u64,
        "{s:?}"
    );
    // The three prefix segments, one per fourth turn; the third prefix
    // segment is read by all fifty fourth ones.
    assert_eq!(s.shared_prefixes, (prefix.len() + STREAMS) as u32, "{s:?}");
    assert_eq!(s.shared_prefix_references, (STREAMS - 1) as u64, "{s:?}");
    assert_eq!(s.shared_prefix_bytes, after.bytes, "{s:?}");

    // A stream whose third turn differs: the first two shared, the third run.
    let before = counted(&mut client).await;
    let mut other = Talker::open(&mut client).await;
    for (role, text) in &prefix[..2] {
        other.say_as(role, text).await;
    }
    let third = "It sums two integers; call it total.";
    other.say_as("assistant", third).await;
    let after_other = counted(&mut client).await;
    assert_eq!(
        after_other.stats.model_calls_total - before.stats.model_calls_total,
        1,
        "only the third turn ran"
    );
    assert_eq!(
        after_other.bytes - before.bytes,
        tokens::turn(third, "assistant").0.len() as u64 * TINY_KV_BYTES_PER_TOKEN,
        "only the third turn's rows are new"
    );
    assert_eq!(after_other.stats.shared_turns_total, s.shared_turns_total + 2);

    drop((talkers, other));
    server
        .wait_stats("every stream gone", |s| s.open_streams == 0 && s.kv_cache_bytes == 0)
        .await;
    let end = counted(&mut client).await;
    assert_eq!((end.bytes, end.stats.shared_prefixes), (0, 0), "nothing left: {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Under a budget that holds the shared prefix and about three streams'
/// own turns, eight streams behind one prefix take turns in rounds: the KV
/// tensors never exceed the budget (census after every turn, its peak
/// covering every call), evicted conversations are rebuilt on the prefix
/// still held by the others (every rebuild recomputes only the tokens after
/// it: the tokens the rebuilds saved are exactly the prefix's per rebuild),
/// and every vector equals its oracle.
async fn evicted_conversations_rebuild_on_the_shared_prefix() {
    const STREAMS: usize = 8;
    const ROUNDS: usize = 4;
    let prefix = prefix();
    let p = tokens_of(&prefix);
    let text = |s: usize, r: usize| format!("stream {s} round {r}: fn g{s}_{r}(v: &[u8]) -> usize {{ v.len() * {r} }}");
    let longest = (0..ROUNDS)
        .map(|r| tokens::turn(&text(7, r), "user").0.len())
        .sum::<usize>();
    let probe = crate::support::profile::of(&models::tiny_dir()).probe_ids.len();
    // The prefix, three streams' own turns, and one call's peak (a rebuild
    // of a whole own part with its probe, gathered past and copy).
    let budget = (p + 3 * longest + 2 * (p + longest + probe) + longest) as u64 * TINY_KV_BYTES_PER_TOKEN;
    let server = TestServer::start(&["--max-kv-bytes", &budget.to_string()]).await;
    let mut client = server.client().await;
    counted(&mut client).await; // (its peak is the warm-up's)

    let mut talkers = Vec::new();
    for _ in 0..STREAMS {
        let mut talker = Talker::open(&mut client).await;
        for (role, text) in &prefix {
            talker.say_as(role, text).await;
        }
        talkers.push(talker);
    }
    let hits_tokens = ((STREAMS - 1) * (p + prefix.len() * probe)) as u64;
    for r in 0..ROUNDS {
        for (s, talker) in talkers.iter_mut().enumerate() {
            talker.say_as("user", &text(s, r)).await;
            let c = counted(&mut client).await;
            assert!(c.bytes <= budget && c.peak <= budget, "within {budget}: {c:?}");
        }
    }
    let s = counted(&mut client).await.stats;
    assert!(
        s.evictions_total > 0 && s.rebuilds_total > 0,
        "the budget forced rebuilds: {s:?}"
    );
    assert_eq!(
        s.shared_tokens_saved_total.checked_sub(hits_tokens),
        Some(s.rebuilds_total * p as u64),
        "every rebuild started from the shared prefix: {s:?}"
    );
    println!(
        "{} rebuilds recomputed {} tokens, the prefix's {p} each reused",
        s.rebuilds_total, s.rebuilt_tokens_total
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A conversation that slides its window past the shared prefix, and one
/// that resets, stop reading it (the census drops by their copies of
/// nothing: only their new contexts are added); when the last conversation
/// reading it ends the prefix is freed, and after every stream nothing is
/// left.
async fn slides_and_resets_let_go_of_the_shared_prefix() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let prefix = prefix();
    let p = tokens_of(&prefix);
    let bytes = |tokens: usize| tokens as u64 * TINY_KV_BYTES_PER_TOKEN;
    let mut holder = Talker::open(&mut client).await;
    let mut sliding = Talker::open(&mut client).await;
    let mut resetting = Talker::open(&mut client).await;
    // The sliding stream's window: the prefix and a little more.
    let window = p + 24;
    let r = sliding
        .send(options(pb::SessionOptions {
            max_context_tokens: window as u32,
            overflow: Overflow::Slide as i32,
            ..Default::default()
        }))
        .await;
    crate::support::stream::ready(&r);
    for talker in [&mut holder, &mut sliding, &mut resetting] {
        for (role, text) in &prefix {
            talker.say_as(role, text).await;
        }
    }
    let shared = counted(&mut client).await;
    assert_eq!(shared.bytes, bytes(p), "one prefix for three streams: {shared:?}");

    // The slide: a turn over the window drops the oldest tokens.
    let long = "fn slide(x: u8) -> u8 { x.rotate_left(3) } // past the window".to_string();
    let response = sliding.send(turn("slide", &long, "user")).await;
    let e = embedding(&response).clone();
    assert!(e.dropped_tokens > 0, "the turn slid the window: {e:?}");
    let mut kept = Context {
        ids: sliding.context.ids[e.dropped_tokens as usize..].to_vec(),
    };
    let span = kept.push(&long, "user");
    let want = oracle(&models::tiny(), &kept.ids, span, &sliding.options);
    assert_close("after the slide", &e.values, &want, F32);
    assert_eq!(e.context_tokens as usize, kept.ids.len());

    // The reset.
    let r = resetting.send(reset("reset")).await;
    assert!(
        matches!(r.result, Some(pb::converse_response::Result::Reset(_))),
        "{r:?}"
    );
    resetting.context = Context::default();
    let fresh = "fn fresh() {}";
    resetting.say_as("user", fresh).await;

    let after = counted(&mut client).await;
    assert_eq!(
        after.bytes,
        bytes(p + kept.ids.len() + tokens::turn(fresh, "user").0.len()),
        "the prefix once (the holder's), the slid context, the reset one: {after:?}"
    );
    assert_eq!(after.stats.shared_prefix_references, 0, "{:?}", after.stats);

    // The last reader ends: the prefix is freed.
    drop(holder);
    let rest = bytes(kept.ids.len() + tokens::turn(fresh, "user").0.len());
    server
        .wait_stats("the holder gone", |s| s.open_streams == 2 && s.kv_cache_bytes == rest)
        .await;
    let c = counted(&mut client).await;
    assert_eq!(c.bytes, rest, "the prefix is freed with its last reader: {c:?}");
    drop((sliding, resetting));
    server
        .wait_stats("every stream gone", |s| s.open_streams == 0 && s.kv_cache_bytes == 0)
        .await;
    let end = counted(&mut client).await;
    assert_eq!((end.bytes, end.stats.shared_prefixes), (0, 0), "nothing left: {end:?}");
}

/// Runs `turns` on a conversation; returns each turn's output.
fn take(c: &mut Conversation, turns: &[(&str, String)]) -> Vec<TurnOutput> {
    turns
        .iter()
        .map(|(role, text)| c.turn(text, role).expect("the turn runs"))
        .collect()
}

/// Checks a conversation's outputs against the one-shot oracle (computed on
/// `plain`, a model that shares nothing) over the context the test tracks.
fn against_oracle(
    what: &str,
    plain: &Model,
    options: &ConversationOptions,
    turns: &[(&str, String)],
    outs: &[TurnOutput],
    tol: Tolerance,
) {
    let mut context = Context::default();
    for ((role, text), out) in turns.iter().zip(outs) {
        let span = context.push(text, role);
        assert_close(what, &out.embedding, &oracle(plain, &context.ids, span, options), tol);
        assert_eq!(out.context_tokens, context.ids.len(), "{what}");
    }
}

#[test]
/// In f32 and fp16, and for a mean over the turn or over the whole
/// conversation: a conversation whose prefix is shared (answered from
/// another's turns, then run on the shared rows gathered into one past,
/// alone and in a batched call) has the same vectors and the same cache,
/// bit for bit, as one on a model that shares nothing, and both meet the
/// one-shot oracle. The negative control: a conversation whose second turn
/// differs by one token has other cache bits, so the comparison sees a
/// single changed row.
fn shared_prefixes_are_bit_exact() {
    for (file, tol) in [("model.onnx", F32), ("model_fp16.onnx", FP16)] {
        for mean_over in [MeanOver::Turn, MeanOver::Conversation] {
            let what = format!("{file} {mean_over:?}");
            let options = ConversationOptions {
                mean_over,
                ..Default::default()
            };
            let (shared, plain) = (models::tiny_private(file), models::tiny_private(file));
            shared.set_shared_prefix_tokens(2048);
            let mut turns = prefix();
            turns.push(("user", "fn four() -> u8 { 4 }".to_string()));
            turns.push(("assistant", "It returns four.".to_string()));

            let mut first = Conversation::new(&shared, options.clone()).unwrap();
            take(&mut first, &turns[..3]);
            let calls = shared.calls();
            let mut second = Conversation::new(&shared, options.clone()).unwrap();
            let outs = take(&mut second, &turns);
            assert_eq!(
                shared.calls() - calls,
                2,
                "{what}: the prefix's three turns were shared"
            );
            let mut alone = Conversation::new(&plain, options.clone()).unwrap();
            let want = take(&mut alone, &turns);
            assert_eq!(
                outs, want,
                "{what}: the shared conversation's outputs are the unshared one's"
            );
            assert!(second.cache().base().is_some(), "{what}: it reads shared rows");
            assert_eq!(
                second.cache().to_bits().unwrap(),
                alone.cache().to_bits().unwrap(),
                "{what}: the same cache"
            );
            against_oracle(&what, &plain, &options, &turns, &outs, tol);

            // Fourth turns of three conversations in one batched call, on
            // the shared prefix and on unshared copies.
            let fourth: Vec<String> = (0..3).map(|i| format!("fn f{i}() -> u32 {{ {i} }}")).collect();
            let batch = |model: &Arc<Model>| {
                let mut cs: Vec<Conversation> = (0..3)
                    .map(|_| {
                        let mut c = Conversation::new(model, options.clone()).unwrap();
                        take(&mut c, &turns[..3]);
                        c
                    })
                    .collect();
                let calls = model.calls();
                let results: Vec<TurnOutput> = {
                    let mut requests: Vec<TurnRequest<'_>> = cs
                        .iter_mut()
                        .zip(&fourth)
                        .map(|(c, text)| TurnRequest {
                            conversation: c,
                            text,
                            role: "user",
                        })
                        .collect();
                    run_turns(&mut requests, BatchLimits::default())
                        .into_iter()
                        .map(|r| r.expect("the batched turn runs"))
                        .collect()
                };
                assert_eq!(model.calls() - calls, 1, "{what}: one batched call");
                (cs, results)
            };
            let (shared_cs, shared_out) = batch(&shared);
            let (plain_cs, plain_out) = batch(&plain);
            assert_eq!(
                shared_out, plain_out,
                "{what}: batched on shared rows or not, the same outputs"
            );
            for (s, p) in shared_cs.iter().zip(&plain_cs) {
                assert!(s.cache().base().is_some());
                assert_eq!(
                    s.cache().to_bits().unwrap(),
                    p.cache().to_bits().unwrap(),
                    "{what}: batched caches"
                );
            }

            // Two conversations make the same segment in one batched call:
            // one is kept (the census holds one turn), both read it.
            let twin = models::tiny_private(file);
            twin.set_shared_prefix_tokens(2048);
            let mut pair: Vec<Conversation> = (0..2)
                .map(|_| Conversation::new(&twin, options.clone()).unwrap())
                .collect();
            {
                let mut requests: Vec<TurnRequest<'_>> = pair
                    .iter_mut()
                    .map(|c| TurnRequest {
                        conversation: c,
                        text: &turns[0].1,
                        role: turns[0].0,
                    })
                    .collect();
                for r in run_turns(&mut requests, BatchLimits::default()) {
                    r.expect("the batched turn runs");
                }
            }
            let per_token = if file.contains("fp16") {
                TINY_KV_BYTES_PER_TOKEN / 2
            } else {
                TINY_KV_BYTES_PER_TOKEN
            };
            let census = twin.ledger_snapshot().expect("the census (faults feature)");
            assert_eq!(
                (census.census, census.ledger),
                (tokens_of(&turns[..1]) as u64 * per_token, census.census),
                "{what}: one copy of the turn made twice at once"
            );
            assert!(Arc::ptr_eq(
                pair[0].cache().base().unwrap(),
                pair[1].cache().base().unwrap()
            ));

            // The negative control.
            let mut other = turns[..3].to_vec();
            other[1].1.push('!');
            let mut changed = Conversation::new(&plain, options.clone()).unwrap();
            take(&mut changed, &other);
            let mut same = Conversation::new(&shared, options.clone()).unwrap();
            take(&mut same, &turns[..3]);
            let (a, b) = (changed.cache().to_bits().unwrap(), same.cache().to_bits().unwrap());
            assert!(
                a.len() != b.len() || a != b,
                "{what}: a changed token changes the cache's bits"
            );
        }
    }
}

#[test]
/// A context that comes back without its cache or its turn boundaries (a
/// session restored from a store, on any replica) is rebuilt on the longest
/// live shared prefix that begins it: only the tokens after it are
/// prefilled (the rebuilt-token count and the tokens-saved counter), and its
/// next vector meets the oracle. With MEAN_OVER_CONVERSATION (the restored
/// context has no running sum) it goes on from the sum a turn left on the
/// prefix; a prefix made by conversations that kept no sum gives it none,
/// and everything is recomputed. The control: once no conversation reads
/// that prefix, the same restore recomputes everything.
fn a_restored_context_rebuilds_on_a_live_prefix() {
    for (held_as, restored_as) in [
        (MeanOver::Turn, MeanOver::Turn),
        (MeanOver::Conversation, MeanOver::Conversation),
        (MeanOver::Turn, MeanOver::Conversation),
    ] {
        let what = format!("prefix held as {held_as:?}, restored as {restored_as:?}");
        // Every conversation before the restore (the prefix's holder, and
        // the one whose context is restored) takes its turns as `held_as`.
        let (model, plain) = (models::tiny_private("model.onnx"), models::tiny_private("model.onnx"));
        model.set_shared_prefix_tokens(2048);
        let over = |mean_over| ConversationOptions {
            mean_over,
            ..ConversationOptions::default()
        };
        let options = over(restored_as);
        let mut turns = prefix();
        let p = tokens_of(&turns);
        let mut holder = Conversation::new(&model, over(held_as)).unwrap();
        take(&mut holder, &turns);
        turns.push(("user", "fn own() -> bool { true }".to_string()));
        turns.push(("assistant", "It is always true.".to_string()));
        let (tokens, n) = {
            let mut gone = Conversation::new(&model, over(held_as)).unwrap();
            take(&mut gone, &turns);
            (gone.tokens().to_vec(), gone.turns())
        };
        let next = ("user", "And now?".to_string());
        let mut context = Context { ids: tokens.clone() };
        let span = context.push(&next.1, next.0);
        let want = oracle(&plain, &context.ids, span, &options);

        let restore = || {
            let saved = model.prefix_stats().tokens_saved;
            let mut c = Conversation::restored(&model, options.clone(), tokens.clone(), n).unwrap();
            let out = c.turn(&next.1, next.0).expect("the restored conversation's turn");
            assert_close(&what, &out.embedding, &want, F32);
            (c, out.rebuilt_tokens, model.prefix_stats().tokens_saved - saved)
        };
        let (restored, rebuilt, saved) = restore();
        let expected = if held_as == restored_as {
            (tokens.len() - p, p as u64)
        } else {
            (tokens.len(), 0)
        };
        assert_eq!((rebuilt, saved), expected, "{what}: rebuilt on the live prefix");
        drop((holder, restored));
        let (_, rebuilt, saved) = restore();
        assert_eq!(
            (rebuilt, saved),
            (tokens.len(), 0),
            "{what}: no live prefix: everything recomputed"
        );
    }
}

#[test]
/// A conversation with other options (here raw MEAN pooling, against the
/// default vector) that takes the same turns reads the same shared rows but
/// is never answered with the other's outputs: each of its turns runs its
/// own call and meets the oracle for its own options.
fn other_options_share_rows_not_answers() {
    let (model, plain) = (models::tiny_private("model.onnx"), models::tiny_private("model.onnx"));
    model.set_shared_prefix_tokens(2048);
    let turns = prefix();
    let mut first = Conversation::new(&model, ConversationOptions::default()).unwrap();
    take(&mut first, &turns);
    let mean = ConversationOptions {
        pooling: stateful_embedder::conversation::Pooling::Mean,
        standardize: stateful_embedder::conversation::Standardize::None,
        ..Default::default()
    };
    let calls = model.calls();
    let mut other = Conversation::new(&model, mean.clone()).unwrap();
    let outs = take(&mut other, &turns);
    assert_eq!(
        model.calls() - calls,
        turns.len() as u64,
        "every turn ran: no answer was borrowed"
    );
    assert!(
        Arc::ptr_eq(first.cache().base().unwrap(), other.cache().base().unwrap()),
        "the rows are the same segments"
    );
    assert_eq!(model.prefix_stats().hits, 0);
    against_oracle("other options", &plain, &mean, &turns, &outs, F32);
}

#[test]
/// A round's turns that have not run yet read their conversations' shared
/// segments. Evicting one of them to make room for another frees those
/// rows: the turn is planned again as a rebuild, and the segments its own
/// plan held are let go first, not found again as a live prefix and read as
/// before. Three conversations of their own texts, each within the sharing
/// bound, under a budget with nothing resting in it that holds the three
/// caches but no call beside them: the first turn evicts the other two,
/// which rebuild, and every vector meets its oracle. (When the plan kept its
/// segments, the evictions freed nothing and the first turn failed with
/// OverBudget, as a loaded server's rounds showed.)
fn evicting_a_waiting_turn_frees_its_shared_rows() {
    let (model, plain) = (models::tiny_private("model.onnx"), models::tiny_private("model.onnx"));
    model.set_shared_prefix_tokens(2048);
    let options = ConversationOptions::default();
    let history = |i: usize| -> Vec<(&'static str, String)> {
        (0..3)
            .map(|t| {
                let body: String = (0..6).map(|k| format!("let v{k} = f{i}_{t}(x{k}, {k});\n")).collect();
                ("user", format!("conversation {i}, part {t}:\n{body}"))
            })
            .collect()
    };
    let mut convs: Vec<Conversation> = (0..3)
        .map(|i| {
            let mut c = Conversation::new(&model, options.clone()).unwrap();
            take(&mut c, &history(i));
            c
        })
        .collect();
    let held: u64 = convs.iter().map(|c| c.context_len() as u64).sum::<u64>() * TINY_KV_BYTES_PER_TOKEN;
    let snapshot = model.ledger_snapshot().expect("the census is on in the tests");
    assert_eq!(
        (snapshot.ledger, snapshot.census),
        (held, held),
        "three caches, held once each"
    );
    let next = |i: usize| ("user", format!("and now conversation {i}?"));
    let want: Vec<Vec<f32>> = (0..3)
        .map(|i| {
            let mut context = Context::default();
            for (role, text) in history(i) {
                context.push(&text, role);
            }
            let span = context.push(&next(i).1, next(i).0);
            oracle(&plain, &context.ids, span, &options)
        })
        .collect();

    let room = KvBudget::new(model.clone(), held);
    let texts: Vec<(&str, String)> = (0..3).map(next).collect();
    let results = {
        let mut requests: Vec<TurnRequest<'_>> = convs
            .iter_mut()
            .zip(&texts)
            .map(|(conversation, (role, text))| TurnRequest {
                conversation,
                text,
                role,
            })
            .collect();
        run_turns_within(
            &mut requests,
            BatchLimits {
                max_turns: 1,
                ..Default::default()
            },
            &room,
        )
    };
    for (i, (r, want)) in results.into_iter().zip(&want).enumerate() {
        let out = r.unwrap_or_else(|e| panic!("conversation {i}: {e}"));
        assert_close(&format!("conversation {i}"), &out.embedding, want, F32);
    }
    assert!(
        room.evictions() >= 2,
        "the first turn evicted the others: {}",
        room.evictions()
    );
    let after = model.ledger_snapshot().unwrap();
    assert!(
        after.peak <= held,
        "the census's peak {} within the budget {held}",
        after.peak
    );
    assert_eq!(after.ledger, after.census);
}
