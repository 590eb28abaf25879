-- The expiry index no longer starts with the farm. A placement batch's lookup of its users'
-- pending logons (`farm = … AND user_key IN (…)`) must take the primary key; while the table had
-- no statistics (a new database, the first minute of a logon storm) PostgreSQL took
-- `(farm, expires_at)` instead, for its farm prefix alone, and read every pending logon of the
-- farm for each batch (25 ms a batch at 18,000 pending logons). Deleting expired rows needs only
-- the expiry. (SQLite keeps `(farm, expires_at)`: the lookup's `+expires_at` is enough there.)
DROP INDEX pending_logons_by_expiry;
CREATE INDEX pending_logons_by_expiry ON pending_logons (expires_at);
