//! The engine's side of a turn's life: admitting the jobs of the queue as
//! turns to run ([`OpenReplies::admit`]: a stream's conversation taken out
//! of its slot, a fresh conversation per `Embed` text, each turn planned
//! once), and delivering each result where it goes: back into a stream's
//! slot and its oneshot, or into an `Embed`'s results, sent when all are in.

use std::{collections::HashMap, sync::Arc};

use tokio::sync::oneshot;

use super::{
    budget::Slot,
    schedule::{Replies, Work},
    stats::{EngineStats, QueueTicket},
};
use crate::{
    conversation::{Conversation, ConversationOptions, Turn, TurnError, TurnOutput},
    model::Model,
};

/// What a turn job answers (the conversation is back in its slot by then:
/// after the turn, or exactly as before it on error).
pub type TurnReply = Result<TurnOutput, TurnError>;

/// What an `Embed` job answers: one result per text, in order.
pub type EmbedReply = Vec<Result<TurnOutput, TurnError>>;

/// A request in the engine's queue, until the worker admits it.
pub(super) enum Job {
    /// A stream's turn: its conversation rests in `slot` until then.
    Turn {
        slot: Arc<Slot>,
        text: String,
        role: String,
        tx: oneshot::Sender<TurnReply>,
        span: tracing::Span,
        ticket: QueueTicket,
    },
    /// An `Embed`: each text a one-turn conversation of its own.
    Embed {
        texts: Vec<String>,
        options: ConversationOptions,
        tx: oneshot::Sender<EmbedReply>,
        span: tracing::Span,
        tickets: Vec<QueueTicket>,
    },
}

/// Where a turn's result goes, with the text's place in the queue count.
/// (Field order: the ticket drops last.)
pub(super) struct Reply {
    to: ReplyTo,
    ticket: QueueTicket,
}

/// A stream's oneshot (and the slot its conversation goes back to), or
/// result `index` of `Embed` job `job`.
enum ReplyTo {
    Stream {
        tx: oneshot::Sender<TurnReply>,
        slot: Arc<Slot>,
    },
    Embed {
        job: u64,
        index: usize,
    },
}

/// An `Embed` job being answered: its oneshot, a result per text, and how
/// many are still to come.
struct EmbedJob {
    tx: oneshot::Sender<EmbedReply>,
    results: Vec<Option<Result<TurnOutput, TurnError>>>,
    open: usize,
}

/// The replies the engine owes: the counters and the `Embed` jobs still
/// answering.
pub(super) struct OpenReplies {
    stats: Arc<EngineStats>,
    embeds: HashMap<u64, EmbedJob>,
    next_embed: u64,
}

impl OpenReplies {
    pub(super) fn new(stats: Arc<EngineStats>) -> Self {
        Self {
            stats,
            embeds: HashMap::new(),
            next_embed: 0,
        }
    }

    /// The turns of `jobs`, each planned once, as work for the scheduler; an
    /// `Embed` job gets a fresh conversation per text and an entry for its
    /// results.
    pub(super) fn admit(&mut self, model: &Arc<Model>, jobs: Vec<Job>) -> Vec<Work<Reply>> {
        let mut work = Vec::with_capacity(jobs.len());
        for job in jobs {
            match job {
                Job::Turn {
                    slot,
                    text,
                    role,
                    tx,
                    span,
                    ticket,
                } => {
                    ticket.started();
                    if tx.is_closed() {
                        continue; // the conversation rests in its slot, untouched
                    }
                    let Some(conversation) = slot.take() else {
                        // The service sends a conversation's turns one at a time.
                        let _ = tx.send(Err(TurnError::Busy));
                        continue;
                    };
                    let turn = span.in_scope(|| Turn::start(conversation, &text, &role));
                    let reply = Reply {
                        to: ReplyTo::Stream { tx, slot },
                        ticket,
                    };
                    work.push(Work::new(turn, reply, span, text.len()));
                }
                Job::Embed {
                    texts,
                    options,
                    tx,
                    span,
                    tickets,
                } => {
                    for ticket in &tickets {
                        ticket.started();
                    }
                    if tx.is_closed() {
                        continue; // the tickets drop with the job
                    }
                    let job = self.next_embed;
                    self.next_embed += 1;
                    let mut embed = EmbedJob {
                        tx,
                        results: Vec::with_capacity(texts.len()),
                        open: 0,
                    };
                    for (index, (text, ticket)) in texts.into_iter().zip(tickets).enumerate() {
                        match Conversation::new(model, options.clone()) {
                            Ok(conversation) => {
                                embed.results.push(None);
                                embed.open += 1;
                                let turn = span.in_scope(|| Turn::start(conversation, &text, ""));
                                let reply = Reply {
                                    to: ReplyTo::Embed { job, index },
                                    ticket,
                                };
                                work.push(Work::new(turn, reply, span.clone(), text.len()));
                            }
                            Err(e) => embed.results.push(Some(Err(e.into()))),
                        }
                    }
                    self.embeds.insert(job, embed);
                    self.complete(job);
                }
            }
        }
        work
    }

    /// Sends an `Embed` job's results once every text has one.
    fn complete(&mut self, job: u64) {
        if self.embeds.get(&job).is_some_and(|e| e.open == 0)
            && let Some(embed) = self.embeds.remove(&job)
        {
            let results = embed
                .results
                .into_iter()
                .map(|r| r.expect("every text of an embed job has a result"))
                .collect();
            let _ = embed.tx.send(results);
        }
    }
}

impl Replies<Reply> for OpenReplies {
    fn wanted(&self, reply: &Reply) -> bool {
        match &reply.to {
            ReplyTo::Stream { tx, .. } => !tx.is_closed(),
            ReplyTo::Embed { job, .. } => self.embeds.get(job).is_some_and(|e| !e.tx.is_closed()),
        }
    }

    fn answer(
        &mut self,
        conversation: Conversation,
        reply: Reply,
        span: &tracing::Span,
        result: Option<Result<TurnOutput, TurnError>>,
    ) {
        let _enter = span.enter();
        if let Some(Ok(out)) = &result {
            self.stats.count(out.turn_tokens, out.rebuilt_tokens);
        }
        // Counters move and the conversation is back before the answer goes,
        // so that a client holding the answer sees them moved (and, for an
        // Embed, its caches gone), and its next turn finds the conversation.
        let Reply { to, ticket } = reply;
        match to {
            ReplyTo::Stream { tx, slot } => {
                slot.put(conversation);
                drop(ticket);
                // A failed send means the stream is gone: the conversation is
                // freed with its slot, unless a resumable session keeps it.
                // (No result: the turn was abandoned, nobody waits.)
                if let Some(result) = result {
                    let _ = tx.send(result);
                }
            }
            ReplyTo::Embed { job, index } => {
                drop(conversation);
                drop(ticket);
                if let Some(embed) = self.embeds.get_mut(&job) {
                    embed.open -= 1;
                    match result {
                        Some(result) => embed.results[index] = Some(result),
                        // Abandoned: nobody waits for the job any more.
                        None if embed.open == 0 => {
                            self.embeds.remove(&job);
                            return;
                        }
                        None => return,
                    }
                }
                self.complete(job);
            }
        }
    }
}
