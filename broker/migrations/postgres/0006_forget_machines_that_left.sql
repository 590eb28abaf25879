-- A machine that leaves the farm (its agent's REMOVED) is now deleted, as one an administrator
-- removes; brokers before this kept its row in state 'removed' for ever (its sessions and
-- logons in flight were already deleted). Those rows go too.
DELETE FROM machines WHERE state = 'removed';
