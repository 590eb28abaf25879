-- Whether a machine's address is a tsagent front door (accepts PROXY v2 from the farm).
ALTER TABLE machines ADD COLUMN front_door BOOLEAN NOT NULL DEFAULT FALSE;
