'use strict';
// Drives one clients/node ResumableConversation for tests/python/test_store.py:
//   node conversation.js SESSION_ID ADDRESS...
// reads one JSON command per line on stdin ({"turn": text} or {"close": true})
// and answers each with one JSON line on stdout.
const readline = require('node:readline');
const { ResumableConversation } = require('../../clients/node/resumable');

async function main() {
  const [sessionId, ...addresses] = process.argv.slice(2);
  const conversation = await ResumableConversation.open(addresses, {
    sessionId, backoffMs: [20, 500], giveUpAfterMs: 60_000,
  });
  console.log(JSON.stringify({ ready: conversation.sessionId }));
  for await (const line of readline.createInterface({ input: process.stdin })) {
    const command = JSON.parse(line);
    if (command.turn !== undefined) {
      const e = await conversation.turn(command.turn);
      console.log(JSON.stringify({
        values: e.values, context_tokens: e.context_tokens, turns: conversation.turns, resumes: conversation.resumes,
      }));
    } else if (command.close) {
      await conversation.close();
      console.log(JSON.stringify({ closed: true }));
      return;
    }
  }
}

main().then(() => process.exit(0), (e) => {
  console.log(JSON.stringify({ error: String(e), code: e.code ?? null }));
  process.exit(1);
});
