// The README's Node snippet for backends: its `retryable` is the retry rule
// the README states (the same rule block as the server's and the Go and
// Java READMEs; clients/go/examples/send/main_test.go checks the blocks are
// identical). The function is taken from README.md as written and run with
// @grpc/grpc-js's status numbers.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');

// grpc.status of @grpc/grpc-js (the gRPC status codes).
const status = {
  OK: 0, CANCELLED: 1, UNKNOWN: 2, INVALID_ARGUMENT: 3, DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5, ALREADY_EXISTS: 6, PERMISSION_DENIED: 7, RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9, ABORTED: 10, OUT_OF_RANGE: 11, UNIMPLEMENTED: 12,
  INTERNAL: 13, UNAVAILABLE: 14, DATA_LOSS: 15, UNAUTHENTICATED: 16,
};

function readmeRetryable() {
  const m = readme.match(/^function retryable\(err\) \{\n[\s\S]*?\n\}$/m);
  assert.ok(m, 'README.md has `function retryable(err) { ... }`');
  // eslint-disable-next-line no-new-func
  return new Function('grpc', `${m[0]}\nreturn retryable;`)({ status });
}

function ruleList(label) {
  const block = readme.match(/<!-- retry-rule:begin -->([\s\S]*?)<!-- retry-rule:end -->/);
  assert.ok(block, 'README.md has the retry-rule block');
  const item = block[1].split('\n- ').find((l) => l.startsWith(`**${label}**`));
  assert.ok(item, `the rule has a "${label}" list`);
  const before = label === 'retry' ? item.split('and an error')[0] : item.split('. The request')[0];
  return [...before.matchAll(/`([A-Z_]+)`/g)].map((x) => x[1]).filter((c) => c in status);
}

test("README's retryable follows README's retry rule for every status", () => {
  const retryable = readmeRetryable();
  const retry = ruleList('retry');
  const never = ruleList('never retry');
  assert.ok(retry.length >= 8 && never.length >= 8, `${retry} / ${never}`);
  for (const c of retry) assert.equal(retryable({ code: status[c] }), true, c);
  for (const c of never) assert.equal(retryable({ code: status[c] }), false, c);
  assert.equal(retryable(new Error('socket hang up')), true, 'no status: a transport error');
});
