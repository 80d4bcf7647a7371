-- A due job whose ledger entry is gone (expired): its failed event and a dead letter without the
-- change (which is lost), so that it never vanishes silently; it no longer counts as waiting.
-- KEYS: 1 results stream, 2 dead-letter stream, 3 pending hash
-- ARGV: 1 account, 2 stream max length, 3.. event fields and values
-- Reply: 'ok'
local results, dlq, pending = KEYS[1], KEYS[2], KEYS[3]
local account, maxlen = ARGV[1], ARGV[2]
redis.call('XADD', results, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, 3))
redis.call('XADD', dlq, '*', 'original_change', '', 'generation', '0', unpack(ARGV, 3))
if redis.call('HINCRBY', pending, account, -1) <= 0 then redis.call('HDEL', pending, account) end
return 'ok'
