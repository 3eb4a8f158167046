-- refund: gives back what decide.lua committed for some limits of a request that another
-- Redis Cluster slot rejected (limits keyed by different identities hash to different slots,
-- so one request may need one decide call per slot; all-or-nothing then means consume, and
-- refund when any slot said no). The script tollgate loads is prelude.lua, the five algorithm
-- files, the dispatch tables (see decide.lua) and this file, joined.
--
-- KEYS[i]  the state key of limit i (all in one slot).
-- ARGV[1 + 6 * (i - 1) .. 6 + 6 * (i - 1)]  limit i: algorithm code, p1, p2, p3, cost, receipt
--          (the receipt decide.lua returned for it).
-- Reply    the number of limits refunded.
-- A refund never raises a limit above what it would have had without the request; if the
-- window or state moved on meanwhile there is nothing to give back.
for i = 1, #KEYS do
  local a = 6 * (i - 1)
  refunds[tonumber(ARGV[a + 1])](KEYS[i], tonumber(ARGV[a + 6]), tonumber(ARGV[a + 2]),
    tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]))
end
return #KEYS
