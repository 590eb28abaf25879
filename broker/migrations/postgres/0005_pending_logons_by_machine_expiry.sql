-- A machine's logons in flight are counted with the expiry in the same index. Each placement
-- batch reads the farm's changed machines with a count per machine (machine_id = m.id AND
-- expires_at > now); with the machine alone in the index, a kept generic plan could combine it
-- with the expiry index (a BitmapAnd), reading every unexpired logon of every farm once per
-- machine: after a broker restart at 10,000 machines, 700-1,100 changed machines x 17,000
-- logons in flight, 0.2-1.5 s a read instead of a few milliseconds. Deleting a machine's logons
-- uses the same index's first column.
DROP INDEX pending_logons_by_machine;
CREATE INDEX pending_logons_by_machine ON pending_logons (machine_id, expires_at);
