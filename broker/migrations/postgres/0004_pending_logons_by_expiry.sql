-- The expiry index no longer starts with the farm. A placement batch looks up each of its
-- users' pending logon by the primary key (farm, user_key); while the table had no statistics
-- (a new database, the first minute of a logon storm) PostgreSQL could plan that probe on
-- (farm, expires_at) instead, a tie on an empty table, and kept the plan: every probe then read
-- every pending logon of the farm (60 ms a batch at 12,000 pending logons). Deleting expired
-- rows needs only the expiry.
DROP INDEX pending_logons_by_expiry;
CREATE INDEX pending_logons_by_expiry ON pending_logons (expires_at);
