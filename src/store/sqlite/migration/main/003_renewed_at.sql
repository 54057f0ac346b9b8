-- Version 3: when a running request's lease was last renewed; NULL while it has not been
-- renewed since it was handed out (a heartbeat's `working_on` may hand it out again).
ALTER TABLE requests ADD COLUMN renewed_at BIGINT;
