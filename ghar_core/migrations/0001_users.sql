-- The application's own user row, one per identity-provider (Supabase) user.
-- Written by ghar_core.users.get_or_create_user_from_supabase as one upsert
-- keyed on supabase_user_id. gen_random_uuid() is built in since Postgres 13.
CREATE TABLE users (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    supabase_user_id uuid        NOT NULL UNIQUE,
    email            text,
    phone            text,
    full_name        text,
    role             text        NOT NULL DEFAULT 'authenticated',
    app_metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    user_metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz
);

CREATE INDEX users_email_lower_idx ON users (lower(email));
CREATE INDEX users_phone_idx ON users (phone);
