-- Version 3: when a running request's lease was last renewed; NULL while it has not been
-- renewed since it was handed out (a heartbeat's `working_on` may hand it out again).
ALTER TABLE requests ADD COLUMN renewed_at BIGINT;

-- Wake-ups for waiting calls on every instance.
-- Each new pending request and each change of a request's status is announced on the
-- channel `model_relay`; PostgreSQL delivers it to every listening connection when the
-- writing transaction commits, and not at all if it rolls back. Every path that changes a
-- status (create, claim, report, expiry by a read or the sweeper) passes through here.
CREATE OR REPLACE FUNCTION model_relay_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('model_relay', 'pending ' || NEW.runtime_id);
    ELSE
        PERFORM pg_notify('model_relay', 'status ' || NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER requests_notify_insert AFTER INSERT ON requests
    FOR EACH ROW WHEN (NEW.status = 'pending') EXECUTE FUNCTION model_relay_notify();

CREATE TRIGGER requests_notify_status AFTER UPDATE OF status ON requests
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION model_relay_notify();
