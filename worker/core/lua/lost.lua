-- A due job whose ledger entry is gone (expired): its failed event and a dead letter without the
-- change (which is lost), so that it never vanishes silently; it leaves the queue with them and no
-- longer counts as waiting. start.lua only hides such a job for one lease: a worker that dies before
-- this call leaves it for another to report. Reported once: a job no longer queued (another worker
-- reported it) or whose entry is back (enqueued again under its key) is left alone.
-- KEYS: 1 results stream, 2 dead-letter stream (on a Redis Cluster both the account's outbox, as in
--       finish.lua), 3 pending hash, 4 account queue zset, 5 its ledger hash
-- ARGV: 1 account, 2 stream max length, 3 job id, 4.. event fields and values
-- Reply: 1 reported (on a Redis Cluster: its outbox entry id), 0 left alone; or {key, the kind of
--   value it holds, the kind this script keeps there} when a key it writes after its first write
--   (the queue's ZREM) holds another kind (another program writes into this database): nothing
--   written, the job left to report.
local results, dlq, pending, queue, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local account, maxlen, job = ARGV[1], ARGV[2], ARGV[3]

--#include kinds.lua

if redis.call('EXISTS', ledger) == 1 then return 0 end
-- A write refused after the ZREM (WRONGTYPE) would leave the job off its queue unreported: gone
-- without a trace. Those keys are checked first.
local refused = mismatch({[results] = 'stream', [dlq] = 'stream', [pending] = 'hash'})
if refused then return refused end
if redis.call('ZREM', queue, job) == 0 then return 0 end
local reported = 1
if results == dlq then
  reported = redis.call('XADD', results, '*', 'ledger', '', 'letter', '1', 'original_change', '', 'generation', '0',
    unpack(ARGV, 4))
else
  redis.call('XADD', results, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, 4))
  redis.call('XADD', dlq, '*', 'original_change', '', 'generation', '0', unpack(ARGV, 4))
end
if redis.call('HINCRBY', pending, account, -1) <= 0 then redis.call('HDEL', pending, account) end
return reported
