-- Counts the placement transactions of each farm. A broker that placed the farm's last batch
-- reuses its own copy of the farm's machines for the next one while the counter shows that no
-- other broker placed in between.
ALTER TABLE farms ADD COLUMN placements BIGINT NOT NULL DEFAULT 0;
