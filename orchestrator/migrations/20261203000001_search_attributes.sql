-- Search attributes: the input fields a flow declares searchable
-- (order_placement: order_id, customer_id), one row per saga and field,
-- written once with the saga and never updated, so the hot `sagas` row
-- carries no extra index for them. The primary key serves the lookup
-- "sagas whose order_id is o-123".
CREATE TABLE saga_attributes (
    name    TEXT NOT NULL,
    value   TEXT NOT NULL,
    saga_id UUID NOT NULL,
    PRIMARY KEY (name, value, saga_id)
);
-- GetSaga and listings read a saga's attributes by its id.
CREATE INDEX saga_attributes_saga ON saga_attributes (saga_id);
