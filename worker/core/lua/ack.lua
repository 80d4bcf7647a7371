-- On a Redis Cluster: outbox entries of one account published to the results (and dead-letter)
-- streams (worker.core.outbox). Each leaves the outbox, and the terminal ledger entry that names it
-- ('outbox', finish.lua) gets its event's stream id: readers then find the event as on a single
-- Redis. A ledger entry that names another outbox entry (a newer generation's) is left alone.
-- KEYS: 1 the account's outbox stream, then for each entry: its ledger hash (the outbox itself for
--       an entry that names none)
-- ARGV: for each entry: its outbox id, the results stream id its event was published as
-- Reply: how many entries left the outbox
local outbox = KEYS[1]
local acked = 0
for i = 2, #KEYS do
  local id, event_id = ARGV[2 * i - 3], ARGV[2 * i - 2]
  acked = acked + redis.call('XDEL', outbox, id)
  local ledger = KEYS[i]
  if ledger ~= outbox and redis.call('HGET', ledger, 'outbox') == id then
    redis.call('HSET', ledger, 'event_id', event_id)
    redis.call('HDEL', ledger, 'outbox')
  end
end
return acked
