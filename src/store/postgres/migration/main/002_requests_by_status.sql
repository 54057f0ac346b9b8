-- Version 2: the sweeper expires one phase at a time in deadline order, and the metrics
-- count each status, both as a range of one index instead of a scan of the table.
CREATE INDEX requests_by_status ON requests (status, deadline_at);
DROP INDEX requests_active_by_deadline;
